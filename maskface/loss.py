"""Loss registry: every criterion takes logits [B, C] and hard [B] or soft [B, C] targets.

Soft targets (rows summing to 1) come from mixup/cutmix; hard labels are turned into one-hot rows so
that each loss has a single formula and hard labels give exactly the value of their one-hot rows.
Every loss takes per-class weights (``weight``; class_weights computes them from the training
targets); a multi-head loss takes one weight vector per head.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from maskface.labels import HEAD_SIZES, NUM_CLASSES, class_probs_to_heads, decode_class

ClassWeights = torch.Tensor | Sequence[float] | None


class _SoftTargetLoss(nn.Module):
    """Checks shapes, turns hard labels into one-hot rows, then calls ``soft_loss``; holds the
    optional per-class ``weight``."""

    def __init__(self, num_classes: int, weight: ClassWeights = None) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.register_buffer("weight", _class_weights(weight, num_classes))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"{name}: expected logits [B, {self.num_classes}], "
                             f"got {list(logits.shape)}")
        if target.is_floating_point():
            if target.shape != logits.shape:
                raise ValueError(f"{name}: soft targets must match logits {list(logits.shape)}, "
                                 f"got {list(target.shape)}")
            soft = target.float()
        else:
            if target.shape != logits.shape[:1]:
                raise ValueError(f"{name}: hard labels must be [{logits.shape[0]}], "
                                 f"got {list(target.shape)}")
            if target.numel() and (target.min() < 0 or target.max() >= self.num_classes):
                raise ValueError(f"{name}: labels must be in 0..{self.num_classes - 1}, got "
                                 f"{int(target.min())}..{int(target.max())}")
            soft = F.one_hot(target.long(), self.num_classes).float()
        # float32 math even under autocast: log-probabilities of fp16 logits lose too much
        return self.soft_loss(logits.float(), soft)

    def soft_loss(self, logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _class_weights(weight: ClassWeights, num_classes: int) -> torch.Tensor | None:
    if weight is None:
        return None
    weight = torch.as_tensor(weight, dtype=torch.float32).detach().clone()
    if weight.shape != (num_classes,):
        raise ValueError(f"class weights must have {num_classes} values, got {list(weight.shape)}")
    return weight


def _weighted_mean(per_class: torch.Tensor, soft: torch.Tensor,
                   weight: torch.Tensor | None) -> torch.Tensor:
    """Batch mean of per-class losses; with weights, normalised like F.cross_entropy(weight=):
    each term weighted by its class, divided by the summed weight of the targets."""
    if weight is None:
        return per_class.sum(1).mean()
    return (per_class * weight).sum() / (soft @ weight).sum()


class SoftTargetCrossEntropy(_SoftTargetLoss):
    """sum_c -t_c log p_c, optionally class-weighted."""

    def soft_loss(self, logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        return _weighted_mean(-soft * F.log_softmax(logits, 1), soft, self.weight)


class FocalLoss(_SoftTargetLoss):
    """sum_c -t_c (1 - p_c)^gamma log p_c; gamma=0 is cross-entropy."""

    def __init__(self, num_classes: int, gamma: float = 2.0, weight: ClassWeights = None) -> None:
        super().__init__(num_classes, weight)
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        self.gamma = gamma

    def soft_loss(self, logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(logits, 1)
        focus = (1 - log_probs.exp()).pow(self.gamma)
        return _weighted_mean(-soft * focus * log_probs, soft, self.weight)


class LabelSmoothingLoss(_SoftTargetLoss):
    """Cross-entropy against t * (1 - eps) + eps / C; with weights it equals
    F.cross_entropy(weight=, label_smoothing=) on hard labels."""

    def __init__(self, num_classes: int, smoothing: float = 0.1,
                 weight: ClassWeights = None) -> None:
        super().__init__(num_classes, weight)
        if not 0 <= smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = smoothing

    def soft_loss(self, logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        smoothed = soft * (1 - self.smoothing) + self.smoothing / self.num_classes
        return _weighted_mean(-smoothed * F.log_softmax(logits, 1), soft, self.weight)


class SoftF1Loss(_SoftTargetLoss):
    """1 - macro soft-F1 of softmax probabilities over the batch (a weighted mean over classes
    with weights)."""

    def __init__(self, num_classes: int, eps: float = 1e-7, weight: ClassWeights = None) -> None:
        super().__init__(num_classes, weight)
        self.eps = eps

    def soft_loss(self, logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        probs = logits.softmax(1)
        true_pos = (probs * soft).sum(0)
        # 2TP + FP + FN == predicted mass + true mass, per class
        f1 = 2 * true_pos / (probs.sum(0) + soft.sum(0) + self.eps)
        if self.weight is None:
            return 1 - f1.mean()
        return 1 - (f1 * self.weight).sum() / self.weight.sum()


class ArcFaceLoss(_SoftTargetLoss):
    """Additive angular margin on cosine logits (scale * cos theta from CosineClassifier)."""

    def __init__(self, num_classes: int, scale: float = 30.0, margin: float = 0.5,
                 weight: ClassWeights = None) -> None:
        super().__init__(num_classes, weight)
        if scale <= 0 or not 0 <= margin < math.pi / 2:
            raise ValueError(f"arcface needs scale > 0 and 0 <= margin < pi/2, "
                             f"got scale={scale}, margin={margin}")
        self.scale, self.margin = scale, margin
        # past theta = pi - m, cos(theta + m) stops decreasing; fall back to a linear penalty there
        self.threshold = math.cos(math.pi - margin)
        self.linear_penalty = math.sin(math.pi - margin) * margin

    def soft_loss(self, logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        cos = logits / self.scale
        # a tolerance for fp16 rounding; anything larger means the model is not a cosine head
        if cos.abs().max() > 1.001:
            raise ValueError(f"arcface expects cosine logits within [-{self.scale}, {self.scale}] "
                             f"(CosineClassifier with the same scale), got |logit| up to "
                             f"{float(logits.abs().max()):.3g}")
        cos = cos.clamp(-1 + 1e-7, 1 - 1e-7)  # sqrt'(0) is infinite
        sin = (1 - cos.pow(2)).sqrt()
        cos_margin = cos * math.cos(self.margin) - sin * math.sin(self.margin)
        cos_margin = torch.where(cos > self.threshold, cos_margin, cos - self.linear_penalty)
        adjusted = cos + soft * (cos_margin - cos)
        return _weighted_mean(-soft * F.log_softmax(self.scale * adjusted, 1), soft, self.weight)


class BCELoss(_SoftTargetLoss):
    """Per-class BCEWithLogits against one-hot or soft rows, mean over classes and batch; with
    weights each photo counts as much as its class's weight (pos and neg terms alike)."""

    def soft_loss(self, logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return F.binary_cross_entropy_with_logits(logits, soft)
        per_photo = F.binary_cross_entropy_with_logits(logits, soft, reduction="none").mean(1)
        photo_weight = soft @ self.weight
        return (per_photo * photo_weight).sum() / photo_weight.sum()


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "cross_entropy": SoftTargetCrossEntropy,
    "focal": FocalLoss,
    "label_smoothing": LabelSmoothingLoss,
    "f1": SoftF1Loss,
    "arcface": ArcFaceLoss,
    "bce": BCELoss,
}


def _accepted_options(factory: Callable[..., nn.Module], options: dict) -> dict:
    accepted = inspect.signature(factory).parameters
    return {key: value for key, value in options.items() if key in accepted and key != "num_classes"}


def _check_name(name: str) -> None:
    if name not in LOSSES:
        raise ValueError(f"unknown criterion {name!r}; choose one of: {', '.join(LOSSES)}")


class MultiHeadLoss(nn.Module):
    """Sum of one base loss per head of [B, 8] = (mask 3, gender 2, age 3) logits, 18-class
    targets. ``weight``: None, or one class-weight vector per head (3, 2 and 3 values)."""

    def __init__(self, base_name: str, weight: Sequence[ClassWeights] | None = None,
                 **options) -> None:
        super().__init__()
        _check_name(base_name)
        factory = LOSSES[base_name]
        options = _accepted_options(factory, options)
        options.pop("weight", None)
        if weight is None:
            weight = [None] * len(HEAD_SIZES)
        elif isinstance(weight, torch.Tensor) or len(weight) != len(HEAD_SIZES):
            raise ValueError("multi-head class weights are one vector per head (mask 3, gender 2, "
                             "age 3 values), not one per 18-class label")
        self.heads = nn.ModuleList(factory(num_classes=size, weight=w, **options)
                                   for size, w in zip(HEAD_SIZES, weight))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 2 or logits.shape[1] != sum(HEAD_SIZES):
            raise ValueError(f"MultiHeadLoss: expected logits [B, {sum(HEAD_SIZES)}] "
                             f"(mask, gender, age heads), got {list(logits.shape)}")
        if target.is_floating_point():
            if target.shape != (logits.shape[0], NUM_CLASSES):
                raise ValueError(f"MultiHeadLoss: soft targets must be [{logits.shape[0]}, "
                                 f"{NUM_CLASSES}], got {list(target.shape)}")
            head_targets = class_probs_to_heads(target)
        else:
            if target.numel() and (target.min() < 0 or target.max() >= NUM_CLASSES):
                raise ValueError(f"MultiHeadLoss: labels must be in 0..{NUM_CLASSES - 1}, got "
                                 f"{int(target.min())}..{int(target.max())}")
            head_targets = decode_class(target)
        head_logits = logits.split(HEAD_SIZES, dim=1)
        return sum(loss(out, t) for loss, out, t in zip(self.heads, head_logits, head_targets))


# ----------------------------------------------------------------------------------------------
# Class weights from the training targets
# ----------------------------------------------------------------------------------------------
CLASS_WEIGHTS = ("none", "balanced", "effective")
EFFECTIVE_BETA = 0.999  # Cui et al. 2019 try 0.9 .. 0.9999; nearer 1 is nearer 'balanced'


def class_weights(targets: np.ndarray, num_classes: int, mode: str,
                  beta: float = EFFECTIVE_BETA) -> torch.Tensor | None:
    """Per-class loss weights from the training targets (None for 'none').

    balanced: n / (C * n_c), scikit-learn's compute_class_weight('balanced'), inverse frequency.
    effective: 1 / E_c with E_c = (1 - beta^n_c) / (1 - beta), the effective number of samples
    (Cui et al. 2019, "Class-Balanced Loss Based on Effective Number of Samples"), scaled to sum
    to C; beta 0 weighs every class alike, beta -> 1 approaches 'balanced'.
    A class without training targets has no weight: ValueError naming its index.
    """
    if mode == "none":
        return None
    if mode not in CLASS_WEIGHTS:
        raise ValueError(f"unknown class weights {mode!r}; choose one of: {', '.join(CLASS_WEIGHTS)}")
    targets = np.asarray(targets, dtype=np.int64)
    counts = np.bincount(targets, minlength=num_classes)[:num_classes]
    absent = np.flatnonzero(counts == 0)
    if len(absent):
        raise ValueError(f"class(es) {', '.join(map(str, absent))} have no training target")
    if mode == "balanced":
        from sklearn.utils.class_weight import compute_class_weight
        weights = compute_class_weight("balanced", classes=np.arange(num_classes), y=targets)
    else:
        weights = (1 - beta) / (1 - np.power(beta, counts.astype(np.float64)))
        weights = weights * num_classes / weights.sum()
    return torch.tensor(weights, dtype=torch.float32)


def build_loss(name: str, num_classes: int, *, multi_head: bool = False, **options) -> nn.Module:
    """The criterion ``name``, given only those ``options`` its factory accepts.

    So train.py can pass gamma, smoothing, scale, margin and weight to any loss; an option that no
    loss accepts is a typo and raises ValueError.
    """
    _check_name(name)
    known = {key for factory in LOSSES.values() for key in inspect.signature(factory).parameters}
    unknown = sorted(set(options) - known - {"num_classes"})
    if unknown:
        raise ValueError(f"unknown loss option(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(known - {'num_classes'}))}")
    if multi_head:
        if num_classes != NUM_CLASSES:
            raise ValueError(f"a multi-head loss takes {NUM_CLASSES}-class targets, "
                             f"got num_classes={num_classes}")
        return MultiHeadLoss(name, **options)
    factory = LOSSES[name]
    return factory(num_classes=num_classes, **_accepted_options(factory, options))
