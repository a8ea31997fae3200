"""maskface.reporting: the confusion figure with class names and per-head matrices, the most
confident mistakes first, taking turns across classes, and as files in the run folder (the grid
and the photos' paths), a k-fold run's from its out-of-fold predictions."""
import numpy as np
import pandas as pd

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


def test_the_most_confident_mistakes_are_a_png_and_a_csv_naming_the_photos(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (30, 20, 16, 3), dtype=np.uint8)
    truth = rng.integers(0, 18, 30)
    probs = rng.dirichlet(np.ones(18), 30)
    probs[0] = 0.0
    probs[0, (truth[0] + 1) % 18] = 1.0  # photo 0: the most confident mistake
    paths = [f"{k:06d}_female_Asian_45/mask{k % 5 + 1}.jpg" for k in range(30)]
    folds = np.arange(30) % 3
    reporting.write_oof_figures(tmp_path, probs, truth, images, "multi", paths, folds, f1=0.1)
    for name in ("confusion.png", "mistakes.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    table = pd.read_csv(tmp_path / "mistakes.csv")
    predicted = probs.argmax(1)
    assert table.loc[0, "path"] == paths[0] and table.loc[0, "confidence"] == 1.0
    assert table["rank"].tolist() == list(range(1, len(table) + 1)) and 0 < len(table) <= 16
    names = labels.class_names("multi")
    for row in table.itertuples():
        k = paths.index(row.path)
        assert (row.true, row.predicted, row.fold) == (names[truth[k]], names[predicted[k]],
                                                       folds[k])
        assert truth[k] != predicted[k]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion.png", "mistakes.csv",
                                                          "mistakes.png"]  # no temp files


def test_a_model_without_mistakes_still_gets_both_files(tmp_path):
    truth = np.array([0, 1, 2])
    probs = np.eye(18)[truth]
    reporting.write_oof_figures(tmp_path, probs, truth, np.zeros((3, 8, 8, 3), np.uint8),
                                "multi", ["a.jpg", "b.jpg", "c.jpg"], np.zeros(3, int), f1=1.0)
    assert (tmp_path / "mistakes.png").read_bytes().startswith(b"\x89PNG")
    assert pd.read_csv(tmp_path / "mistakes.csv").empty


def test_a_finished_run_shows_its_best_epochs_mistakes_by_path(finished_run, tiny_train_dir):
    mistakes = pd.read_csv(finished_run / "mistakes.csv")
    photos = pd.read_csv(finished_run / "photos.csv").set_index("path")
    assert (finished_run / "mistakes.png").read_bytes().startswith(b"\x89PNG")
    assert len(mistakes) and (photos.loc[mistakes["path"], "role"] == "val").all()
    assert all((tiny_train_dir / p).is_file() for p in mistakes["path"])
    assert (mistakes["true"] != mistakes["predicted"]).all()
