"""What a run shows of itself: TensorBoard scalars and figures per epoch (confusion matrix,
predictions on validation photos)."""
from __future__ import annotations

import math

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
