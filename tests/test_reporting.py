"""maskface.reporting: the confusion figure with class names and per-head matrices, the most
confident mistakes first, taking turns across classes."""
import numpy as np

from maskface import labels, reporting


def test_confident_mistakes_come_first_and_take_turns_across_classes():
    truth = np.array([0, 0, 0, 1, 1, 2, 2])
    predicted = np.array([1, 1, 0, 0, 1, 0, 2])
    probs = np.full((7, 3), 0.1)
    probs[np.arange(7), predicted] = [0.5, 0.9, 0.8, 0.6, 0.8, 0.7, 0.8]
    # class 0's two mistakes (0.9, 0.5), class 1's (0.6), class 2's (0.7): one per class per turn
    assert reporting.confident_mistakes(truth, predicted, probs).tolist() == [1, 5, 3, 0]
    assert reporting.confident_mistakes(truth, predicted, probs, limit=2).tolist() == [1, 5]
    assert len(reporting.confident_mistakes(truth, truth, probs)) == 0


def test_confusion_figure_names_classes_and_has_the_three_heads(tmp_path):
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 18, 200)
    predicted = np.where(rng.random(200) < 0.5, truth, rng.integers(0, 18, 200))
    figure = reporting.confusion_figure(truth, predicted, "multi", title="epoch 3, macro F1 0.5000")
    big, *heads = [axes for axes in figure.axes if axes.get_images()]
    assert [t.get_text() for t in big.get_yticklabels()] == labels.class_names("multi")
    assert [axes.get_title() for axes in heads] == ["mask", "gender", "age"]
    # colour is the share of the true class, so every row with photos sums to 1
    recall = big.get_images()[0].get_array()
    np.testing.assert_allclose(recall.sum(1)[np.bincount(truth, minlength=18) > 0], 1.0)
    counts = [int(t.get_text()) for t in big.texts]
    assert sum(counts) == 200
    png = tmp_path / "confusion.png"
    reporting.save_png(reporting.render(figure), png)
    assert png.read_bytes().startswith(b"\x89PNG")
    assert list(tmp_path.iterdir()) == [png]  # no temporary file left beside it
