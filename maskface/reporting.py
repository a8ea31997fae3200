"""What a run shows of itself: TensorBoard scalars and figures per epoch (per-class F1, the
confusion matrix with class names and per-head matrices, the most confident mistakes on
validation photos), the best epoch's confusion matrix and most confident mistakes (with the
photos' paths) as PNGs in the run folder, a k-fold run's from its out-of-fold predictions, and at
its end an HParams session (flags -> final metrics)."""
from __future__ import annotations

import json
import math
import numbers
from pathlib import Path

import matplotlib
import numpy as np
from sklearn.metrics import confusion_matrix

from maskface import labels, run_folder
from maskface.files import atomic_write_bytes, atomic_write_text, read_csv_checked

matplotlib.use("Agg")  # files and TensorBoard only: no window, no display needed
import matplotlib.pyplot as plt  # noqa: E402

HEAD_NAMES = {"mask": labels.MASK_NAMES, "gender": labels.GENDER_NAMES, "age": labels.AGE_NAMES}


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
    names = labels.class_names(category)
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
    for row, (head, t, p) in enumerate(zip(HEAD_NAMES, labels.decode_class(truth),
                                           labels.decode_class(predicted))):
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


PATH_CHARS = 44  # of a photo's path under its grid cell: the end, which names person and file


def prediction_grid_figure(images: np.ndarray, truth: np.ndarray, predicted: np.ndarray,
                           confidence: np.ndarray, names: list[str], cols: int = 4,
                           paths: list[str] | None = None):
    """The photos as one mosaic in one axes (16 subplots cost more than the model's epoch at
    tiny sizes), each captioned true -> predicted (p), and its path when ``paths`` are given."""
    n, height, width = len(images), images.shape[1], images.shape[2]
    cols = min(n, cols)
    rows = math.ceil(n / cols)
    scale = 2.4 / width  # inches per pixel: a 2.4-inch column whatever the photo size
    # caption room above (a third line for the path), space beside
    gap, margin = int((0.38 if paths is None else 0.52) / scale), int(0.1 / scale)
    cell_h, cell_w = height + gap, width + margin
    mosaic = np.full((rows * cell_h, cols * cell_w, 3), 255, dtype=np.uint8)
    figure = plt.figure(figsize=(cols * cell_w * scale, rows * cell_h * scale + 0.3))
    axes = figure.add_axes((0, 0, 1, 1 - 0.3 / figure.get_figheight()))
    for k, (image, t, p, c) in enumerate(zip(images, truth, predicted, confidence)):
        top, left = (k // cols) * cell_h + gap, (k % cols) * cell_w
        mosaic[top:top + height, left:left + width] = image[..., :3]
        caption = f"true {names[t]}\npred {names[p]} ({c:.2f})"
        if paths is not None:
            path = str(paths[k])
            caption += "\n" + (path if len(path) <= PATH_CHARS else "..." + path[3 - PATH_CHARS:])
        axes.text(left, top - gap * 0.1, caption,
                  fontsize=7, va="bottom", color="green" if t == p else "red")
    axes.imshow(mosaic, aspect="auto", interpolation="nearest")
    axes.axis("off")
    figure.suptitle("most confident mistakes (true -> predicted, p)", fontsize=9, y=0.995)
    return figure


def mistakes_image(images: np.ndarray, rows: np.ndarray, truth: np.ndarray,
                   predicted: np.ndarray, probs: np.ndarray, category: str,
                   margin: tuple[int, int] = (0, 0), paths: list[str] | None = None,
                   title: str = "") -> tuple[np.ndarray | None, np.ndarray]:
    """(the grid of the most confident mistakes as RGB, None when there is none; their positions
    among ``rows``): photos ``images[rows]`` with their ``truth``, ``predicted`` and ``probs``;
    ``margin``: the cache's beyond the crop (the photos shown are the centred crops the model
    saw)."""
    shown = confident_mistakes(truth, predicted, probs)
    if not len(shown):
        return None, shown
    pad_h, pad_w = margin
    photos = np.asarray(images[rows[shown]])
    photos = photos[:, pad_h:photos.shape[1] - pad_h, pad_w:photos.shape[2] - pad_w]
    figure = prediction_grid_figure(photos, truth[shown], predicted[shown],
                                    probs[shown, predicted[shown]], labels.class_names(category),
                                    paths=None if paths is None else [paths[k] for k in shown])
    if title:
        figure.suptitle(f"{title}: most confident mistakes (true -> predicted, p)", fontsize=9,
                        y=0.995)
    return render(figure), shown


def save_mistakes(run_dir: Path, image: np.ndarray | None, shown: np.ndarray, truth: np.ndarray,
                  predicted: np.ndarray, probs: np.ndarray, category: str, paths: list[str],
                  folds: np.ndarray | None = None) -> None:
    """mistakes.png (``image``; a blank note when nothing was wrong) and mistakes.csv beside it:
    rank, the photo's path in the data folder, true and predicted class, confidence (and the
    fold that scored it), in the grid's order."""
    import pandas as pd
    names = labels.class_names(category)
    table = pd.DataFrame({"rank": np.arange(1, len(shown) + 1),
                          "path": [paths[k] for k in shown],
                          "true": [names[t] for t in truth[shown]],
                          "predicted": [names[p] for p in predicted[shown]],
                          "confidence": probs[shown, predicted[shown]].round(4)})
    if folds is not None:
        table["fold"] = folds[shown]
    if image is None:
        figure = plt.figure(figsize=(4, 0.6))
        figure.text(0.5, 0.5, "no wrong prediction", ha="center", va="center")
        image = render(figure)
        plt.close(figure)
    save_png(image, Path(run_dir) / run_folder.MISTAKES)
    atomic_write_text(Path(run_dir) / run_folder.MISTAKES_CSV, table.to_csv(index=False))


def log_epoch(writer, row: dict, val: dict, images: np.ndarray, val_rows: np.ndarray,
              category: str, *, confusion_png: str | Path | None = None,
              which: str = "", margin: tuple[int, int] = (0, 0),
              paths: list[str] | None = None) -> None:
    """TensorBoard scalars and figures of one epoch; ``val`` is what the epoch's candidate for
    best.pth scored (``which``: ' (EMA)' when that is the EMA weights), and ``confusion_png``
    where its confusion matrix is also saved, with its most confident mistakes beside it
    (mistakes.png, mistakes.csv naming the photos by ``paths``, one per val row); ``margin``:
    the cache's beyond the crop (the photos shown are the centred crops the model saw)."""
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
    grid, shown = mistakes_image(images, val_rows, truth, predicted, val["probs"], category,
                                 margin, paths, title=f"epoch {step}{which}")
    if grid is not None:
        writer.add_image("Predictions/val", grid, step, dataformats="HWC")
    if confusion_png is not None and paths is not None:
        save_mistakes(Path(confusion_png).parent, grid, shown, truth, predicted, val["probs"],
                      category, paths)
    plt.close("all")


def write_oof_figures(run_dir: Path, probs: np.ndarray, truth: np.ndarray, images: np.ndarray,
                      category: str, paths: list[str], folds: np.ndarray, f1: float,
                      margin: tuple[int, int] = (0, 0)) -> None:
    """A k-fold run's own confusion.png and mistakes.png + mistakes.csv, from its out-of-fold
    probabilities (``probs``, one row per photo of ``images``; ``truth`` in the scored classes)."""
    predicted = probs.argmax(1)
    save_png(render(confusion_figure(truth, predicted, category,
                                     title=f"out-of-fold, macro F1 {f1:.4f}")),
             Path(run_dir) / run_folder.CONFUSION)
    grid, shown = mistakes_image(images, np.arange(len(truth)), truth, predicted, probs,
                                 category, margin, paths, title="out-of-fold")
    save_mistakes(run_dir, grid, shown, truth, predicted, probs, category, paths, folds)
    plt.close("all")


# bookkeeping flags: where files go and how often to log say nothing about the experiment
HPARAMS_SKIPPED = ("model_dir", "cache_dir", "config", "resume", "log_interval", "num_workers",
                   "log_seconds", "progress")
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


def run_hparams_metrics(summary: list[dict], best_f1: float, best_epoch: int,
                        wall_s: float) -> dict:
    """What a finished model reports in HParams: its best val F1 (and that epoch's per-head F1
    when the model's weights, not their EMA, scored it), epochs, speed and wall time."""
    metrics = {"best_val_f1": best_f1, "best_epoch": best_epoch, "epochs_done": len(summary),
               "wall_s": wall_s,
               "images_per_s": float(np.mean([r["images_per_s"] for r in summary]))
               if summary else None}
    if 1 <= best_epoch <= len(summary) and summary[best_epoch - 1]["val_f1"] == best_f1:
        best = summary[best_epoch - 1]
        metrics.update({f"val_{head}": best[head] for head in ("f1_mask", "f1_gender", "f1_age")})
    return metrics


def log_kfold_hparams(run_dir: Path, flags: dict, n_folds: int, oof_metrics: dict) -> None:
    """One HParams session for a whole k-fold run, in its folder: its flags -> OOF F1 (and
    per-head F1), the folds' mean best val F1, summed epochs and wall time, mean speed."""
    folds = []
    for k in range(n_folds):
        try:
            folds.append(json.loads((run_folder.fold_dir(run_dir, k) / run_folder.DONE).read_text()))
        except (OSError, ValueError):  # a hand-edited one costs the HParams row its sums only
            folds.append({})
    speeds = [speed for k in range(n_folds) for speed in read_csv_checked(
        run_folder.fold_dir(run_dir, k) / run_folder.SUMMARY, ["images_per_s"])["images_per_s"]]
    metrics = {f"oof_{k}": v for k, v in oof_metrics.items()}
    metrics.update({"best_val_f1": float(np.mean([f.get("best_f1", np.nan) for f in folds])),
                    "epochs_done": sum(f.get("epochs_done", 0) for f in folds),
                    "wall_s": sum(f.get("wall_s", 0.0) for f in folds),
                    "images_per_s": float(np.mean(speeds)) if speeds else None})
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(str(run_dir)) as writer:
        log_hparams(writer, flags, metrics)
