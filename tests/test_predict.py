"""maskface.predict: per-class scores equal scikit-learn's, also for a category run; the TTA views."""
import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_recall_fscore_support

from maskface import labels, predict
from maskface.cli import UserError


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


# ---------------------------------------------------------------------------- TTA views
def test_tta_views_are_named_in_one_registry_and_checked():
    assert list(predict.TTA_VIEWS) == ["flip", "shift", "scale"]
    assert predict.tta_transforms("none") == []
    assert len(predict.tta_transforms("flip")) == 1
    assert len(predict.tta_transforms("flip,shift,scale")) == 1 + 4 + 2
    for bad in ("flip,flip", "rotate", "flip,"):
        with pytest.raises(UserError, match="--tta .*expected none, or views"):
            predict.tta_transforms(bad)


def test_shift_and_scale_views_move_and_zoom_the_uint8_batch():
    import torch
    images = torch.randint(0, 256, (2, 32, 24, 3), dtype=torch.uint8)
    right, left, down, up = predict.TTA_VIEWS["shift"]
    shifted = right(images)  # 1/16 of the width: 24 / 16 = 1.5 pixels right
    assert shifted.dtype == torch.uint8 and shifted.shape == images.shape
    two = predict._warp(dx=2 / 24)(images)  # whole pixels: an exact move
    assert torch.equal(two[:, :, 2:], images[:, :, :-2])
    assert torch.equal(predict._warp(dy=-2 / 32)(images)[:, :-2], images[:, 2:])
    assert torch.equal(predict._warp()(images), images)  # no warp: the same pixels
    # zoomed in, a horizontal ramp is stretched: its rise per pixel falls by the zoom
    ramp = torch.arange(24, dtype=torch.uint8).mul(10).expand(1, 32, 24).unsqueeze(-1)
    zoom_in, zoom_out = predict.TTA_VIEWS["scale"]
    slope = lambda view: float(view(ramp)[0, 16, 14, 0]) - float(view(ramp)[0, 16, 10, 0])  # noqa: E731
    assert slope(zoom_in) == pytest.approx(40 / predict.ZOOM, abs=1.5)
    assert slope(zoom_out) == pytest.approx(40 * predict.ZOOM, abs=1.5)
    assert float(zoom_in(ramp)[0, 16, 12, 0]) == pytest.approx(float(ramp[0, 16, 12, 0]), abs=6)
