"""Reporting built for macro F1: class names, per-class scores equal to scikit-learn's, the worst
class, the confusion figure with names and per-head matrices, the most confident mistakes."""
import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_recall_fscore_support

from maskface import labels, predict, reporting


def test_class_names_follow_the_class_formula():
    names = labels.class_names("multi")
    assert len(names) == 18 and names[9] == "09 incorrect-female-<30"
    for m, mask in enumerate(labels.MASK_NAMES):
        for g, gender in enumerate(labels.GENDER_NAMES):
            for a, age in enumerate(labels.AGE_NAMES):
                label = labels.encode_class(m, g, a)
                assert names[label] == f"{label:02d} {mask}-{gender}-{age}"
    assert labels.class_names("gender") == ["0 male", "1 female"]
    assert labels.class_names("age", 6)[-1] == "5 60+"
    assert len(labels.class_names("multi", 6)) == 36


def test_per_class_scores_equal_sklearn_on_a_fixed_prediction():
    truth = np.array([0, 0, 0, 1, 1, 5, 5, 9, 9, 9, 17, 17])
    predicted = np.array([0, 0, 1, 1, 1, 5, 0, 9, 17, 17, 17, 3])
    per_class = predict.per_class_scores(truth, predicted, "multi")
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=np.arange(18), zero_division=0)
    names = labels.class_names("multi")
    assert list(per_class) == names  # every class of the category, in class order
    for c, name in enumerate(names):
        row = per_class[name]
        assert row["precision"] == pytest.approx(precision[c])
        assert row["recall"] == pytest.approx(recall[c])
        assert row["f1"] == pytest.approx(f1[c])
        assert row["support"] == support[c]
    assert per_class["03 wear-female-<30"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                               "support": 0}
    # the worst class is the lowest F1 among classes with photos (17: F1 0.4; 3 has none)
    assert predict.worst_class(per_class) == ("17 not_wear-female-60+", pytest.approx(0.4))
    metrics = predict.score(np.eye(18)[predicted], truth, "multi")
    assert metrics["per_class"] == per_class
    assert metrics["f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))


def test_per_class_scores_of_a_category_run_use_its_classes():
    truth, predicted = np.array([0, 1, 2, 2]), np.array([0, 2, 2, 2])
    per_class = predict.score(np.eye(3)[predicted], labels.encode_class(truth, 0, 0), "mask")["per_class"]
    assert list(per_class) == ["0 wear", "1 incorrect", "2 not_wear"]
    assert per_class["1 incorrect"]["recall"] == 0 and per_class["2 not_wear"]["recall"] == 1


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
