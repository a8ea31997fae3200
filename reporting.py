"""What a run shows of itself: TensorBoard scalars and figures per epoch (confusion matrix,
predictions on validation photos), and at its end an HParams session (flags -> final metrics)."""
from __future__ import annotations

import math
import numbers

import matplotlib
import numpy as np
from sklearn.metrics import confusion_matrix

matplotlib.use("Agg")  # files and TensorBoard only: no window, no display needed
import matplotlib.pyplot as plt  # noqa: E402


def confusion_figure(truth: np.ndarray, predicted: np.ndarray, n_classes: int):
    matrix = confusion_matrix(truth, predicted, labels=list(range(n_classes)))
    figure, axes = plt.subplots(figsize=(6, 6))
    axes.imshow(matrix, cmap="Blues")
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            axes.text(j, i, str(count), ha="center", va="center", fontsize=6)
    return figure


def prediction_grid_figure(images: np.ndarray, truth: np.ndarray, predicted: np.ndarray):
    n = len(images)
    cols = min(n, 8)
    rows = math.ceil(n / cols)
    figure, grid = plt.subplots(rows, cols, figsize=(cols * 1.5, rows * 2), squeeze=False)
    for axes, image, t, p in zip(grid.flat, images, truth, predicted):
        axes.imshow(image[..., :3])
        axes.set_title(f"{t}->{p}", fontsize=8, color="green" if t == p else "red")
    for axes in grid.flat:
        axes.axis("off")
    return figure


def log_epoch(writer, row: dict, val: dict, images: np.ndarray, val_rows: np.ndarray,
              n_classes: int) -> None:
    step = row["epoch"]
    writer.add_scalar("Loss/train", row["train_loss"], step)
    writer.add_scalar("LR", row["lr"], step)
    if not len(val_rows):
        return
    writer.add_scalar("Loss/val", row["val_loss"], step)
    writer.add_scalar("F1/val", row["val_f1"], step)
    writer.add_scalar("Acc/val", row["val_acc"], step)
    for head in ("mask", "gender", "age"):
        if row[f"f1_{head}"] != "":
            writer.add_scalar(f"F1/{head}", row[f"f1_{head}"], step)
    truth = val["truth"]
    figure = confusion_figure(truth, val["predictions"], n_classes)
    writer.add_figure("Confusion/val", figure, step)
    shown = slice(0, min(16, len(val_rows)))
    figure = prediction_grid_figure(np.asarray(images[val_rows[shown]]), truth[shown],
                                    val["predictions"][shown])
    writer.add_figure("Predictions/val", figure, step)
    plt.close("all")


# bookkeeping flags: where files go and how often to log say nothing about the experiment
HPARAMS_SKIPPED = ("model_dir", "cache_dir", "config", "resume", "log_interval", "num_workers")
# every run declares all of them (TensorBoard shows the columns of one run's declaration, picked
# arbitrarily); a run logs the values it has: single runs val_*, k-fold runs oof_* too
HPARAMS_METRICS = ("best_val_f1", "val_f1_mask", "val_f1_gender", "val_f1_age", "oof_f1",
                   "oof_acc", "oof_f1_mask", "oof_f1_gender", "oof_f1_age", "best_epoch",
                   "epochs_done", "images_per_s", "wall_s")


def hparam_value(value):
    """A flag as TensorBoard's HParams takes it: numbers and strings as they are, bools as
    'true'/'false', lists as '128x96'-style strings."""
    if isinstance(value, (list, tuple)):
        return "x".join(map(str, value))
    if isinstance(value, bool):  # torch's hparams() would log it as the number 0 or 1
        return str(value).lower()
    return value


def log_hparams(writer, flags: dict, metrics: dict) -> None:
    """One HParams session in ``writer``'s own folder (so TensorBoard's HParams tab shows one row
    per run folder): the run's flags -> its final metrics, as 'hparams/<name>' scalars. Metrics
    that are missing or not finite (no validation) are left out."""
    from torch.utils.tensorboard.summary import hparams
    shown = {k: hparam_value(v) for k, v in flags.items()
             if k not in HPARAMS_SKIPPED and v is not None}
    values = {f"hparams/{k}": float(v) for k, v in metrics.items()
              if isinstance(v, numbers.Real) and math.isfinite(v)}
    declared = dict.fromkeys(f"hparams/{k}" for k in (*HPARAMS_METRICS, *metrics))
    # SummaryWriter.add_hparams would open a second, timestamped run folder per call
    for summary in hparams(shown, declared):
        writer.file_writer.add_summary(summary)
    for tag, value in values.items():
        writer.add_scalar(tag, value)
    writer.flush()
