"""What a run shows of itself: TensorBoard scalars and figures per epoch (per-class F1, the
confusion matrix with class names and per-head matrices, the most confident mistakes on
validation photos), and the best epoch's confusion matrix as a PNG in the run folder."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
from sklearn.metrics import confusion_matrix

import dataset
from checked_io import atomic_write_bytes

matplotlib.use("Agg")  # files and TensorBoard only: no window, no display needed
import matplotlib.pyplot as plt  # noqa: E402

HEAD_NAMES = {"mask": dataset.MASK_NAMES, "gender": dataset.GENDER_NAMES, "age": dataset.AGE_NAMES}


def _draw_matrix(axes, truth: np.ndarray, predicted: np.ndarray, names, title: str,
                 fontsize: float) -> matplotlib.image.AxesImage:
    """One confusion matrix: colour = share of the true class (recall), the count in each cell."""
    counts = confusion_matrix(truth, predicted, labels=list(range(len(names))))
    rows = counts.sum(1, keepdims=True)
    recall = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    image = axes.imshow(recall, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(counts):
        if count:
            axes.text(j, i, str(count), ha="center", va="center", fontsize=fontsize,
                      color="white" if recall[i, j] > 0.6 else "black")
    ticks = list(range(len(names)))
    axes.set_xticks(ticks, names, rotation=90, fontsize=fontsize)
    axes.set_yticks(ticks, names, fontsize=fontsize)
    axes.set_xlabel("predicted", fontsize=fontsize + 1)
    axes.set_ylabel("true", fontsize=fontsize + 1)
    axes.set_title(title, fontsize=fontsize + 2)
    return image


def confusion_figure(truth: np.ndarray, predicted: np.ndarray, category: str, *,
                     title: str = ""):
    """The confusion matrix of a run's classes with their names, normalised by true class; for
    18 classes the mask, gender and age matrices beside it. Fixed margins (no tight bounding
    box): it is drawn once per epoch, and a second layout pass would double the cost."""
    names = dataset.class_names(category)
    if category != "multi":
        figure = plt.figure(figsize=(5.5, 4.5))
        figure.subplots_adjust(left=0.2, right=0.95, bottom=0.22, top=0.9)
        image = _draw_matrix(figure.add_subplot(), truth, predicted, names, title, fontsize=9)
        figure.colorbar(image, ax=figure.axes, label="share of the true class (recall)")
        return figure
    figure = plt.figure(figsize=(15, 10))
    grid = figure.add_gridspec(3, 2, width_ratios=(3.2, 1), hspace=0.6, wspace=0.35,
                               left=0.14, right=0.9, bottom=0.17, top=0.9)
    image = _draw_matrix(figure.add_subplot(grid[:, 0]), truth, predicted, names,
                         "18 classes (counts in cells)", fontsize=8)
    for row, (head, t, p) in enumerate(zip(HEAD_NAMES, dataset.decode_class(truth),
                                           dataset.decode_class(predicted))):
        _draw_matrix(figure.add_subplot(grid[row, 1]), t, p, HEAD_NAMES[head], head, fontsize=8)
    figure.colorbar(image, ax=figure.axes, shrink=0.6, label="share of the true class (recall)")
    if title:
        figure.suptitle(title, fontsize=13, y=0.96)
    return figure


def render(figure) -> np.ndarray:
    """The figure drawn once, as RGB uint8 [H, W, 3] (for TensorBoard and the PNG alike)."""
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def save_png(image: np.ndarray, path: str | Path) -> None:
    """An RGB image as a PNG, written atomically (a reader never sees half an image)."""
    import cv2
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    atomic_write_bytes(path, encoded.tobytes())


def save_figure(figure, path: str | Path) -> None:
    save_png(render(figure), path)


def confident_mistakes(truth: np.ndarray, predicted: np.ndarray, probs: np.ndarray,
                       limit: int = 16) -> np.ndarray:
    """Positions of wrong predictions, most confident first, taking turns across true classes so
    that one confused class does not fill the grid."""
    wrong = np.flatnonzero(truth != predicted)
    confidence = probs[wrong, predicted[wrong]]
    queues: dict[int, list[int]] = {}
    for position in wrong[np.argsort(-confidence, kind="stable")]:
        queues.setdefault(int(truth[position]), []).append(int(position))
    picked: list[int] = []
    turn = list(queues.values())  # classes in the order of their most confident mistake
    while len(picked) < limit and any(turn):
        for queue in turn:
            if queue and len(picked) < limit:
                picked.append(queue.pop(0))
    return np.asarray(picked, dtype=np.int64)


def prediction_grid_figure(images: np.ndarray, truth: np.ndarray, predicted: np.ndarray,
                           confidence: np.ndarray, names: list[str], cols: int = 4):
    """The photos as one mosaic in one axes (16 subplots cost more than the model's epoch at
    tiny sizes), each captioned true -> predicted (p)."""
    n, height, width = len(images), images.shape[1], images.shape[2]
    cols = min(n, cols)
    rows = math.ceil(n / cols)
    scale = 2.4 / width  # inches per pixel: a 2.4-inch column whatever the photo size
    gap, margin = int(0.38 / scale), int(0.1 / scale)  # caption room above, space beside
    cell_h, cell_w = height + gap, width + margin
    mosaic = np.full((rows * cell_h, cols * cell_w, 3), 255, dtype=np.uint8)
    figure = plt.figure(figsize=(cols * cell_w * scale, rows * cell_h * scale + 0.3))
    axes = figure.add_axes((0, 0, 1, 1 - 0.3 / figure.get_figheight()))
    for k, (image, t, p, c) in enumerate(zip(images, truth, predicted, confidence)):
        top, left = (k // cols) * cell_h + gap, (k % cols) * cell_w
        mosaic[top:top + height, left:left + width] = image[..., :3]
        axes.text(left, top - gap * 0.1, f"true {names[t]}\npred {names[p]} ({c:.2f})",
                  fontsize=7, va="bottom", color="green" if t == p else "red")
    axes.imshow(mosaic, aspect="auto", interpolation="nearest")
    axes.axis("off")
    figure.suptitle("most confident mistakes (true -> predicted, p)", fontsize=9, y=0.995)
    return figure


def log_epoch(writer, row: dict, val: dict, images: np.ndarray, val_rows: np.ndarray,
              category: str, *, confusion_png: str | Path | None = None,
              which: str = "", margin: tuple[int, int] = (0, 0)) -> None:
    """TensorBoard scalars and figures of one epoch; ``val`` is what the epoch's candidate for
    best.pth scored (``which``: ' (EMA)' when that is the EMA weights), and ``confusion_png``
    where its confusion matrix is also saved; ``margin``: the cache's beyond the crop (the
    photos shown are the centred crops the model saw)."""
    step = row["epoch"]
    writer.add_scalar("Loss/train", row["train_loss"], step)
    writer.add_scalar("LR", row["lr"], step)
    if not len(val_rows):
        return
    writer.add_scalar("Loss/val", row["val_loss"], step)
    writer.add_scalar("F1/val", row["val_f1"], step)
    writer.add_scalar("Acc/val", row["val_acc"], step)
    if row.get("val_f1_ema", "") != "":
        writer.add_scalar("F1/val_ema", row["val_f1_ema"], step)
    for head in ("mask", "gender", "age"):
        if row[f"f1_{head}"] != "":
            writer.add_scalar(f"F1/{head}", row[f"f1_{head}"], step)
    for name, scores in val["per_class"].items():
        writer.add_scalar(f"F1_class/{name}", scores["f1"], step)
    truth, predicted = val["truth"], val["predictions"]
    image = render(confusion_figure(truth, predicted, category,
                                    title=f"epoch {step}, macro F1 {val['f1']:.4f}{which}"))
    if confusion_png is not None:
        save_png(image, confusion_png)
    writer.add_image("Confusion/val", image, step, dataformats="HWC")
    shown = confident_mistakes(truth, predicted, val["probs"])
    if len(shown):
        pad_h, pad_w = margin
        photos = np.asarray(images[val_rows[shown]])
        photos = photos[:, pad_h:photos.shape[1] - pad_h, pad_w:photos.shape[2] - pad_w]
        figure = prediction_grid_figure(photos, truth[shown], predicted[shown],
                                        val["probs"][shown, predicted[shown]],
                                        dataset.class_names(category))
        writer.add_image("Predictions/val", render(figure), step, dataformats="HWC")
    plt.close("all")
