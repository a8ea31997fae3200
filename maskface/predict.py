"""Probabilities, views and scores: predicting batches (test-time views), evaluating and scoring
with the competition's macro F1. Training (validation, out-of-fold), inference and the benchmark
all predict through here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from maskface import augmentation, dataset, image_cache, labels, mixed_precision, model as models
from maskface import scores
from maskface.cli import UserError
from maskface.distributed import Processes


@torch.no_grad()
def predict_probabilities(model: nn.Module, batches, augment: nn.Module, *, category: str,
                          age_label_num: int = 3, autocast_dtype=None, channels_last: bool = False,
                          criterion: nn.Module | None = None) -> tuple[np.ndarray, float]:
    """Scored-space probabilities for every batch (eval mode, in order) and the mean loss."""
    model.eval()
    augment.eval()
    device = next(model.parameters()).device
    probs, total_loss, seen = [], 0.0, 0
    for images, targets, _ in batches:
        inputs = augment(images)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(inputs).float()
        if criterion is not None:
            total_loss += criterion(logits, targets).item() * len(images)
            seen += len(images)
        p = models.class_probabilities(model.model_config, logits).cpu().numpy()
        probs.append(labels.fold_age6(p, category) if age_label_num == 6 else p)
    return np.concatenate(probs), total_loss / max(seen, 1)


def _mirror(images: torch.Tensor) -> torch.Tensor:
    return images.flip(2)  # uint8 [B, H, W, C]: W is dim 2


def _warp(zoom: float = 1.0, dx: float = 0.0, dy: float = 0.0):
    """A view of a uint8 [B, H, W, C] batch: the content zoomed by ``zoom`` about the centre and
    moved by ``dx`` / ``dy`` of the width / height, bilinear, mirrored beyond the edges as
    training's warps and the cache's crops are (never black borders the model never saw), back
    to uint8 so the model's own eval preprocessing follows."""
    def view(images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        theta = torch.tensor([[1 / zoom, 0.0, -2 * dx], [0.0, 1 / zoom, -2 * dy]],
                             dtype=x.dtype, device=x.device).expand(len(x), 2, 3)
        grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        out = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                                              align_corners=False)
        return out.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return view


SHIFT = 1 / 16  # of the height / width: 8 x 6 pixels at 128 x 96
ZOOM = 1.1

# --tta's named views: each adds these transforms of the cached batch to the original view, and
# every view's probabilities are averaged with equal weight. Measured on the dev set in
# docs/ensembles.md (which pay, and what each costs).
TTA_VIEWS: dict[str, tuple] = {
    "flip": (_mirror,),
    "shift": (_warp(dx=SHIFT), _warp(dx=-SHIFT), _warp(dy=SHIFT), _warp(dy=-SHIFT)),
    "scale": (_warp(zoom=ZOOM), _warp(zoom=1 / ZOOM)),
}
TTA_MODES = ("none", *TTA_VIEWS)  # the single-view spellings


def tta_view_names(tta: str) -> list[str]:
    """The view names of ``tta`` ('none': [], else names of TTA_VIEWS separated by commas, each
    once); ValueError saying what is expected otherwise."""
    if tta == "none":
        return []
    names = [name.strip() for name in tta.split(",")]
    if any(name not in TTA_VIEWS for name in names) or len(set(names)) < len(names):
        raise ValueError("expected none, or views separated by commas, each once, from "
                         + ", ".join(TTA_VIEWS))
    return names


def tta_transforms(tta: str) -> list:
    """The transforms of ``tta`` (tta_view_names) added to the original view; UserError on an
    unknown name."""
    try:
        names = tta_view_names(tta)
    except ValueError as why:
        raise UserError(f"--tta {tta}: {why}") from None
    return [transform for name in names for transform in TTA_VIEWS[name]]


def viewed(batches, transform):
    """The same batches seen through one TTA transform (applied on the batch's device)."""
    for images, targets, rows in batches:
        yield transform(images), targets, rows


def predict_views(model: nn.Module, batches, augment: nn.Module, *, tta: str = "none",
                  category: str, age_label_num: int = 3, autocast_dtype=None,
                  channels_last: bool = False) -> np.ndarray:
    """Scored-space probabilities averaged over the test-time views: the photo and each
    transform of ``tta`` (tta_transforms: flip, shift, scale or a comma list of them)."""
    views = [batches, *(viewed(batches, t) for t in tta_transforms(tta))]
    probs = [predict_probabilities(model, view, augment, category=category,
                                   age_label_num=age_label_num, autocast_dtype=autocast_dtype,
                                   channels_last=channels_last)[0] for view in views]
    return np.stack([p.astype(np.float64) for p in probs]).mean(0)


def score(probs: np.ndarray, true_labels: np.ndarray, category: str) -> dict:
    """Macro F1 (sklearn, the competition's metric), accuracy, for 18 classes per-head F1, and
    'per_class' (per_class_scores) of the probabilities' argmax."""
    return scores.label_scores(labels.category_target(true_labels, category), probs.argmax(1),
                               category)


per_class_scores = scores.per_class_scores  # one implementation, shared with ensemble_csv.py
worst_class = scores.worst_class


def evaluate(model: nn.Module, batches, augment: nn.Module, true_labels: np.ndarray, *,
             category: str, age_label_num: int = 3, criterion=None, autocast_dtype=None,
             channels_last: bool = False, procs: Processes = Processes(),
             positions: np.ndarray | None = None) -> dict:
    """Val loss, macro F1, accuracy, per-head F1, plus 'probs', 'predictions' and 'truth'.

    Under torchrun each process predicts its share of the photos (``batches``, at ``positions``
    of ``true_labels``); the shares are gathered so every process returns the same metrics.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module  # eval needs no gradient sync, and ranks see different photos
    probs, loss = predict_probabilities(
        model, batches, augment, category=category, age_label_num=age_label_num,
        autocast_dtype=autocast_dtype, channels_last=channels_last, criterion=criterion)
    positions = np.arange(len(true_labels)) if positions is None else positions
    parts = procs.gather((positions, probs, loss * len(positions)))
    all_probs = np.zeros((len(true_labels), probs.shape[1]))
    for where, part, _ in parts:
        all_probs[where] = part
    val_loss = sum(p[2] for p in parts) / max(len(true_labels), 1)
    return {"loss": val_loss, **score(all_probs, true_labels, category), "probs": all_probs,
            "predictions": all_probs.argmax(1),
            "truth": labels.category_target(true_labels, category)}


# ----------------------------------------------------------------------------------------------
# A trained model, and its probabilities: what training (out-of-fold), inference and the
# benchmark all predict with
# ----------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A network and everything its checkpoint says about feeding it."""
    path: Path | None
    net: nn.Module
    name: str
    category: str
    age_label_num: int
    preprocess: image_cache.Preprocess
    augmentation: str
    normalize: dict
    face: dict
    precision: mixed_precision.Precision

    def describe(self) -> str:
        height, width = self.preprocess.resize
        bins = " (6 age bins)" if self.age_label_num == 6 else ""
        return (f"model: {self.path} | {self.name} | {self.category}{bins} | "
                f"resize {height}x{width} | crop {self.preprocess.crop} | "
                f"{self.precision.describe()}")


def restore(checkpoint: dict, path: Path | None, device: torch.device,
            precision: mixed_precision.Precision | None = None) -> LoadedModel:
    """The trained model of a checkpoint (a loaded best.pth), in eval mode on the CPU, run in
    ``precision`` or, when not given, the precision it trained with."""
    try:
        net = models.restore_model(checkpoint).eval()
    except (UserError, ValueError, TypeError) as why:  # model_config arguments from the file
        raise UserError(f"{path}: {why}") from None
    config = checkpoint.get("config") or {}
    return LoadedModel(
        path=path, net=net, name=str(config.get("model") or checkpoint["model_config"].get("name")),
        category=checkpoint["category"], age_label_num=int(checkpoint.get("age_label_num", 3)),
        preprocess=image_cache.Preprocess.from_dict(checkpoint["preprocess"]),
        augmentation=checkpoint.get("augmentation", "BaseAugmentation"),
        normalize=checkpoint["normalize"], face=checkpoint.get("face") or {},
        precision=precision or mixed_precision.recorded_precision(checkpoint, device))


def model_probabilities(m: LoadedModel, images: np.ndarray, rows: np.ndarray | None = None, *,
                        device: torch.device, batch_size: int, tta: str = "none") -> np.ndarray:
    """Scored-space probabilities [N, 18|3|2] of ``m`` for ``rows`` of the image cache (all of
    them when not given), in its precision, averaged over the TTA views. The network is moved to
    ``device`` (and left there)."""
    net = m.net.to(device)
    if m.precision.channels_last:
        net.to(memory_format=torch.channels_last)
    # eval mode: the centred crop of the cache (the margin, if any, is for training's random
    # crops) and normalisation; a user pipeline is never applied here
    augment = augmentation.build_augmentation(m.augmentation, m.normalize["mean"],
                                              m.normalize["std"], m.preprocess.channels,
                                              margin=m.preprocess.margin_pixels).to(device)
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    batches = dataset.CachedBatches(images, np.zeros(len(rows), dtype=np.int64), rows,
                                    batch_size, device)
    return predict_views(net, batches, augment, tta=tta, category=m.category,
                         age_label_num=m.age_label_num, autocast_dtype=m.precision.autocast_dtype,
                         channels_last=m.precision.channels_last)
