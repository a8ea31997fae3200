"""Probabilities, views and scores: predicting batches (test-time views), evaluating and scoring
with the competition's macro F1. Training (validation, out-of-fold), inference and the benchmark
all predict through here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import classification_report, f1_score
from torch import nn

from maskface import augmentation, dataset, image_cache, labels, mixed_precision, model as models
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


def mirrored(batches):
    """The same batches flipped left to right, for flip TTA."""
    for images, targets, rows in batches:  # uint8 [B, H, W, C]: W is dim 2
        yield images.flip(2), targets, rows


TTA_MODES = ("none", "flip")


def predict_views(model: nn.Module, batches, augment: nn.Module, *, tta: str = "none",
                  category: str, age_label_num: int = 3, autocast_dtype=None,
                  channels_last: bool = False) -> np.ndarray:
    """Scored-space probabilities averaged over the test-time views (--tta flip: the photo and
    its mirror image)."""
    views = [batches, mirrored(batches)] if tta == "flip" else [batches]
    probs = [predict_probabilities(model, view, augment, category=category,
                                   age_label_num=age_label_num, autocast_dtype=autocast_dtype,
                                   channels_last=channels_last)[0] for view in views]
    return np.stack([p.astype(np.float64) for p in probs]).mean(0)


def score(probs: np.ndarray, true_labels: np.ndarray, category: str) -> dict:
    """Macro F1 (sklearn, the competition's metric), accuracy, for 18 classes per-head F1, and
    'per_class' (per_class_scores)."""
    truth = labels.category_target(true_labels, category)
    predicted = probs.argmax(1)
    metrics = {"f1": f1_score(truth, predicted, average="macro"),
               "acc": float((truth == predicted).mean())}
    if category == "multi":
        for head, t, p in zip(("mask", "gender", "age"), labels.decode_class(truth),
                              labels.decode_class(predicted)):
            metrics[f"f1_{head}"] = f1_score(t, p, average="macro")
    metrics["per_class"] = per_class_scores(truth, predicted, category)
    return metrics


def per_class_scores(truth: np.ndarray, predicted: np.ndarray, category: str) -> dict:
    """{class name: {precision, recall, f1, support}} for every class of ``category``, from
    scikit-learn's classification_report (a class never predicted scores 0, not a warning).
    Macro F1 is the mean of these F1s over the classes present in truth or predictions."""
    names = labels.class_names(category)
    report = classification_report(truth, predicted, labels=np.arange(len(names)),
                                   target_names=names, output_dict=True, zero_division=0)
    return {name: {"precision": float(report[name]["precision"]),
                   "recall": float(report[name]["recall"]),
                   "f1": float(report[name]["f1-score"]),
                   "support": int(report[name]["support"])} for name in names}


def worst_class(per_class: dict) -> tuple[str, float] | None:
    """(name, F1) of the class with the lowest F1 among those with photos; None without any."""
    present = [(name, row["f1"]) for name, row in per_class.items() if row["support"]]
    return min(present, key=lambda item: item[1]) if present else None


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
