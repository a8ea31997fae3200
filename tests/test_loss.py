"""maskface.loss: every loss in LOSSES against torch and its definition, hard and soft targets,
multi-head sums, class weights."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskface.labels import HEAD_SIZES, NUM_CLASSES, decode_class
from maskface.loss import LOSSES, MultiHeadLoss, build_loss
from maskface.model import CosineClassifier

BATCH = 6
SCALE = 30.0


def make_logits(name: str, num_classes: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if name == "arcface":  # arcface needs cosine logits within [-scale, scale]
        cos = torch.rand(BATCH, num_classes, generator=generator) * 2 - 1
        return (cos * SCALE).requires_grad_()
    return (torch.randn(BATCH, num_classes, generator=generator) * 2).requires_grad_()


def make_labels(num_classes: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, num_classes, (BATCH,), generator=torch.Generator().manual_seed(seed))


def make_soft(num_classes: int) -> torch.Tensor:
    """A mixup of two label sets, the way soft targets reach the loss."""
    first = F.one_hot(make_labels(num_classes, seed=1), num_classes).float()
    second = F.one_hot(make_labels(num_classes, seed=2), num_classes).float()
    return 0.7 * first + 0.3 * second


def test_registry_has_the_documented_losses():
    # a subset, so adding a loss to the registry does not break it
    assert {"cross_entropy", "focal", "label_smoothing", "f1", "arcface", "bce"} <= set(LOSSES)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("num_classes", [18, 3, 2])
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_finite_scalar_with_gradient(name, num_classes, kind):
    logits = make_logits(name, num_classes)
    target = make_labels(num_classes) if kind == "hard" else make_soft(num_classes)
    value = build_loss(name, num_classes)(logits, target)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("num_classes", [18, 3, 2])
def test_hard_equals_one_hot(name, num_classes):
    criterion = build_loss(name, num_classes)
    logits = make_logits(name, num_classes)
    labels = make_labels(num_classes)
    one_hot = F.one_hot(labels, num_classes).float()
    torch.testing.assert_close(criterion(logits, labels), criterion(logits, one_hot))


@pytest.mark.parametrize("name", list(LOSSES))
def test_wrong_logits_width_raises(name):
    criterion = build_loss(name, 3)
    with pytest.raises(ValueError, match=r"expected logits \[B, 3\], got \[6, 18\]"):
        criterion(make_logits(name, 18), make_labels(3))


def test_wrong_target_shape_and_range_raise():
    criterion = build_loss("cross_entropy", 3)
    logits = make_logits("cross_entropy", 3)
    with pytest.raises(ValueError, match="soft targets"):
        criterion(logits, make_soft(2))
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.2"):
        criterion(logits, torch.full((BATCH,), 3))


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="unknown criterion 'hinge'; choose one of: "
                                         "cross_entropy, focal, label_smoothing, f1, arcface, bce"):
        build_loss("hinge", 3)


def test_unknown_option_raises_but_foreign_options_are_dropped():
    with pytest.raises(ValueError, match="unknown loss option"):
        build_loss("focal", 3, gama=2.0)
    # train.py passes every option; each loss keeps only its own
    criterion = build_loss("f1", 3, gamma=1.0, smoothing=0.2, scale=10.0, margin=0.1)
    assert criterion.num_classes == 3


@pytest.mark.parametrize("num_classes", [18, 3, 2])
def test_cross_entropy_matches_torch(num_classes):
    logits, labels = make_logits("cross_entropy", num_classes), make_labels(num_classes)
    torch.testing.assert_close(build_loss("cross_entropy", num_classes)(logits, labels),
                               F.cross_entropy(logits, labels))


def test_weighted_cross_entropy_matches_torch():
    weight = torch.linspace(0.5, 2.0, 3)
    logits, labels = make_logits("cross_entropy", 3), make_labels(3)
    criterion = build_loss("cross_entropy", 3, weight=weight)
    torch.testing.assert_close(criterion(logits, labels), F.cross_entropy(logits, labels, weight=weight))
    with pytest.raises(ValueError, match="3 values"):
        build_loss("cross_entropy", 3, weight=[1.0, 2.0])


@pytest.mark.parametrize("num_classes", [18, 3, 2])
def test_label_smoothing_matches_cross_entropy_and_torch(num_classes):
    logits, labels, soft = make_logits("x", num_classes), make_labels(num_classes), make_soft(num_classes)
    ce = build_loss("cross_entropy", num_classes)
    no_smoothing = build_loss("label_smoothing", num_classes, smoothing=0.0)
    torch.testing.assert_close(no_smoothing(logits, labels), ce(logits, labels))
    torch.testing.assert_close(no_smoothing(logits, soft), ce(logits, soft))
    smoothed = build_loss("label_smoothing", num_classes, smoothing=0.2)
    torch.testing.assert_close(smoothed(logits, labels),
                               F.cross_entropy(logits, labels, label_smoothing=0.2))
    assert not torch.allclose(smoothed(logits, labels), ce(logits, labels))


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_focal_gamma_zero_is_cross_entropy(kind):
    logits = make_logits("focal", 18)
    target = make_labels(18) if kind == "hard" else make_soft(18)
    focal = build_loss("focal", 18, gamma=0.0)(logits, target)
    torch.testing.assert_close(focal, build_loss("cross_entropy", 18)(logits, target))
    # the default gamma down-weights every sample, so it must differ (and be smaller)
    assert build_loss("focal", 18)(logits, target) < focal


@pytest.mark.parametrize("num_classes", [18, 3, 2])
def test_f1_perfect_beats_wrong(num_classes):
    labels = torch.arange(BATCH * 3) % num_classes
    one_hot = F.one_hot(labels, num_classes).float()
    criterion = build_loss("f1", num_classes)
    perfect = criterion(one_hot * 20, labels)
    wrong = criterion(one_hot.roll(1, dims=1) * 20, labels)
    assert perfect < 0.01 and wrong > 0.99


@pytest.mark.parametrize("num_classes", [18, 3, 2])
def test_arcface_margin_penalises(num_classes):
    logits, labels = make_logits("arcface", num_classes), make_labels(num_classes)
    arcface = build_loss("arcface", num_classes, scale=SCALE, margin=0.5)(logits, labels)
    assert arcface > F.cross_entropy(logits, labels)
    no_margin = build_loss("arcface", num_classes, scale=SCALE, margin=0.0)(logits, labels)
    torch.testing.assert_close(no_margin, F.cross_entropy(logits, labels))


def test_arcface_rejects_non_cosine_logits():
    with pytest.raises(ValueError, match="cosine logits"):
        build_loss("arcface", 3, scale=SCALE)(torch.full((2, 3), 2 * SCALE), torch.tensor([0, 1]))


def test_cosine_classifier_range_and_arcface_end_to_end():
    head = CosineClassifier(16, 18, scale=SCALE)
    features = torch.randn(BATCH, 16) * 50
    features[0] = head.weight[3].detach() * 7  # exactly aligned: cos == 1
    logits = head(features)
    assert logits.shape == (BATCH, 18)
    assert logits.abs().max() <= SCALE
    assert logits[0, 3].detach().item() == pytest.approx(SCALE, abs=1e-3)
    build_loss("arcface", 18, scale=SCALE)(logits, make_labels(18)).backward()
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()


def per_head_sum(name: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    mask, gender, age = decode_class(labels)
    mask_logits, gender_logits, age_logits = logits[:, :3], logits[:, 3:5], logits[:, 5:]
    return (build_loss(name, 3)(mask_logits, mask) + build_loss(name, 2)(gender_logits, gender)
            + build_loss(name, 3)(age_logits, age))


@pytest.mark.parametrize("name", list(LOSSES))
def test_multi_head_is_sum_of_heads(name):
    criterion = build_loss(name, NUM_CLASSES, multi_head=True)
    assert isinstance(criterion, MultiHeadLoss)
    logits, labels = make_logits(name, sum(HEAD_SIZES)), make_labels(NUM_CLASSES)
    value = criterion(logits, labels)
    torch.testing.assert_close(value, per_head_sum(name, logits, labels))
    one_hot = F.one_hot(labels, NUM_CLASSES).float()
    torch.testing.assert_close(criterion(logits, one_hot), value)
    mixed = criterion(logits, make_soft(NUM_CLASSES))
    assert torch.isfinite(mixed)
    mixed.backward()
    assert torch.isfinite(logits.grad).all()


def test_multi_head_checks():
    criterion = build_loss("cross_entropy", NUM_CLASSES, multi_head=True)
    with pytest.raises(ValueError, match=r"expected logits \[B, 8\]"):
        criterion(torch.zeros(2, 18), torch.tensor([0, 17]))
    with pytest.raises(ValueError, match="labels must be in 0..17"):
        criterion(torch.zeros(2, 8), torch.tensor([0, 18]))
    with pytest.raises(ValueError, match="18-class targets"):
        build_loss("cross_entropy", 3, multi_head=True)
    with pytest.raises(ValueError, match="multi-head"):
        build_loss("cross_entropy", NUM_CLASSES, multi_head=True, weight=torch.ones(18))


# ---------------------------------------------------------------------------- class weights
def test_class_weights_balanced_is_sklearns_and_effective_follows_cui_et_al():
    from sklearn.utils.class_weight import compute_class_weight

    from maskface.loss import class_weights
    targets = np.array([0] * 50 + [1] * 5 + [2] * 20)
    balanced = class_weights(targets, 3, "balanced")
    np.testing.assert_allclose(balanced, compute_class_weight("balanced", classes=np.arange(3), y=targets),
                               rtol=1e-6)
    beta = 0.99
    effective = class_weights(targets, 3, "effective", beta=beta)
    raw = (1 - beta) / (1 - beta ** np.array([50.0, 5.0, 20.0]))
    np.testing.assert_allclose(effective, raw * 3 / raw.sum(), rtol=1e-6)
    assert effective[1] > effective[2] > effective[0]  # the rarest class weighs most
    np.testing.assert_allclose(class_weights(targets, 3, "effective", beta=0.0), np.ones(3))
    assert class_weights(targets, 3, "none") is None
    with pytest.raises(ValueError, match="class.* 3 have no training target"):
        class_weights(targets, 4, "balanced")


def _weighted_soft_cross_entropy(logits, soft, weight):
    per_term = -soft * F.log_softmax(logits, 1) * weight
    return per_term.sum() / (soft @ weight).sum()


def test_weighted_losses_match_torch_and_their_definition():
    weight = torch.tensor([0.2, 3.0, 1.0])
    logits, labels, soft = make_logits("x", 3), make_labels(3), make_soft(3)
    torch.testing.assert_close(build_loss("label_smoothing", 3, smoothing=0.2, weight=weight)(logits, labels),
                               F.cross_entropy(logits, labels, weight=weight, label_smoothing=0.2))
    torch.testing.assert_close(build_loss("cross_entropy", 3, weight=weight)(logits, soft),
                               _weighted_soft_cross_entropy(logits, soft, weight))
    # focal: each photo's term times its class weight, over the summed weight
    p_true = F.softmax(logits, 1).gather(1, labels[:, None]).squeeze(1)
    w = weight[labels]
    expected = (w * -(1 - p_true) ** 2 * p_true.log()).sum() / w.sum()
    torch.testing.assert_close(build_loss("focal", 3, weight=weight)(logits, labels), expected)
    # bce: each photo counts as much as its class
    per_photo = F.binary_cross_entropy_with_logits(logits, F.one_hot(labels, 3).float(),
                                                   reduction="none").mean(1)
    torch.testing.assert_close(build_loss("bce", 3, weight=weight)(logits, labels),
                               (per_photo * w).sum() / w.sum())


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_every_loss_takes_class_weights(name, kind):
    logits = make_logits(name, 3)
    target = make_labels(3) if kind == "hard" else make_soft(3)
    plain = build_loss(name, 3)(logits, target)
    # weights that are all alike change nothing, whatever their scale
    torch.testing.assert_close(build_loss(name, 3, weight=torch.full((3,), 2.5))(logits, target), plain)
    weighted = build_loss(name, 3, weight=torch.tensor([0.1, 5.0, 1.0]))(logits, target)
    assert torch.isfinite(weighted) and not torch.allclose(weighted, plain)


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_multi_head_loss_weighs_each_head_with_its_own_vector(kind):
    head_weights = [torch.tensor([1.0, 4.0, 0.5]), torch.tensor([2.0, 0.5]), torch.tensor([0.3, 1.0, 3.0])]
    logits = make_logits("x", 8)
    target = make_labels(NUM_CLASSES) if kind == "hard" else make_soft(NUM_CLASSES)
    criterion = build_loss("cross_entropy", NUM_CLASSES, multi_head=True, weight=head_weights)
    if kind == "hard":
        head_targets = [F.one_hot(t, size).float() for t, size in zip(decode_class(target), HEAD_SIZES)]
    else:
        from maskface.labels import class_probs_to_heads
        head_targets = class_probs_to_heads(target)
    expected = sum(_weighted_soft_cross_entropy(out, t, w) for out, t, w in
                   zip(logits.split(HEAD_SIZES, 1), head_targets, head_weights))
    torch.testing.assert_close(criterion(logits, target), expected)
    assert not torch.allclose(criterion(logits, target),
                              build_loss("cross_entropy", NUM_CLASSES, multi_head=True)(logits, target))
