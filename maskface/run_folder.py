"""A run's folder and every file in it, named here and nowhere else: its name ({name}, then
{name}2, {name}3, ...), config.json and photos.csv written together, summary.csv, per_class.csv,
the k-fold files, the folder of a run that failed before its first checkpoint removed, and the
record of the photos a run trains on (path, content digest, label, role), which a --resume
compares with today's data so that it continues the same experiment or refuses.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import pandas as pd

from maskface.cli import UserError
from maskface.files import atomic_write_text, read_csv_checked, remove_stale_temps, write_together
from maskface.labels import check_labels

# the files of a run folder (a k-fold run: the run's own, and a fold{k}/ folder per fold)
CONFIG = "config.json"            # every resolved flag (a replay's defaults)
PHOTOS = "photos.csv"             # every photo trained on: path, profile, label, digest, role
BEST = "best.pth"                 # the best epoch's weights, with all inference needs
LAST = "last.pth"                 # the last epoch, with all --resume needs
SUMMARY = "summary.csv"           # one row per epoch
PER_CLASS = "per_class.csv"       # the best epoch's (k-fold: the out-of-fold) per-class scores
CONFUSION = "confusion.png"       # the best epoch's confusion matrices
DONE = "done.json"                # written once the run (or fold) has finished
FOLDS = "folds.csv"               # k-fold: profile -> fold
OOF = "oof.csv"                   # k-fold: every photo scored by the fold model that never saw it
OOF_METRICS = "oof_metrics.json"  # k-fold: the out-of-fold scores
CALIBRATION = "calibration.json"  # inference.py --fit_calibration: per-class offsets

SUMMARY_FIELDS = ["epoch", "train_loss", "val_loss", "val_f1", "val_acc", "f1_mask", "f1_gender",
                  "f1_age", "lr", "seconds", "images_per_s", "val_f1_ema"]
PER_CLASS_FIELDS = ["class", "precision", "recall", "f1", "support"]


def fold_dir(run_dir: Path, fold: int) -> Path:
    """The folder of fold ``fold`` of a k-fold run."""
    return Path(run_dir) / f"fold{fold}"


def fold_dirs(run_dir: Path) -> list[Path]:
    """The fold folders a k-fold run has on disk, in fold order."""
    found = [d for d in Path(run_dir).glob("fold*") if d.is_dir() and d.name[4:].isdigit()]
    return sorted(found, key=lambda d: int(d.name[4:]))


def last_checkpoints(run_dir: Path) -> list[Path]:
    """Every last.pth of a run (its own, then its folds'), in that order."""
    lasts = [Path(run_dir) / LAST, *(d / LAST for d in fold_dirs(run_dir))]
    return [p for p in lasts if p.is_file()]


def new_run_dir(model_dir: str | Path, name: str) -> Path:
    """{model_dir}/{name}, else {name}2, {name}3, ... (created, so parallel runs never share one).
    The number is appended to the whole name, so dotted names like 'lr1e-3.v2' number right."""
    root = Path(model_dir)
    root.mkdir(parents=True, exist_ok=True)
    number = 1
    while True:
        candidate = root / (name if number == 1 else f"{name}{number}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            number += 1


def prepare_run_dir(settings, photos: pd.DataFrame) -> Path:
    """The run folder, with config.json and photos.csv written together: --resume's, {name} itself
    when one fold of a shared k-fold run is trained (--fold), else a new {name}, {name}2, ..."""
    if settings.resume:
        run_dir = Path(settings.resume)
        remove_stale_temps(run_dir, ".*.tmp")  # a checkpoint save cut short by a kill
    elif settings.fold is not None:
        run_dir = Path(settings.model_dir) / settings.name
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        run_dir = new_run_dir(settings.model_dir, settings.name)
    write_together({run_dir / CONFIG: json.dumps(settings.record(), indent=2).encode(),
                    run_dir / PHOTOS: photos.to_csv(index=False).encode()})
    return run_dir


def remove_if_no_checkpoint(run_dir: Path) -> None:
    """A new run that failed before its first checkpoint (no weights offline, a loss that blew up
    at once, out of memory) leaves no folder behind: it would only hold a config and an empty log."""
    if not any(run_dir.rglob("*.pth")):
        shutil.rmtree(run_dir, ignore_errors=True)


def write_per_class(path: Path, per_class: dict) -> None:
    """per_class.csv: precision, recall, F1 and support of every class (predict.per_class_scores)."""
    table = pd.DataFrame([{"class": name, **scores} for name, scores in per_class.items()],
                         columns=PER_CLASS_FIELDS)
    atomic_write_text(path, table.to_csv(index=False, float_format="%.4f"))


def write_summary(path: Path, rows: list[dict]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())


def photo_record(frame: pd.DataFrame, data_dir: Path, roles) -> pd.DataFrame:
    """One row per photo of the run: path (inside the data folder), profile, label, its content
    digest (what the image cache is keyed by) and its role: train or val, or its fold."""
    from maskface.image_cache import photo_digests  # OpenCV: not for ensemble_csv.py's start
    return pd.DataFrame({"path": [os.path.relpath(p, data_dir) for p in frame["path"]],
                         "profile": frame["profile"].to_numpy(), "label": frame["label"].to_numpy(),
                         "digest": photo_digests(frame["path"].tolist()),
                         "role": roles})


def data_fingerprint(photos: pd.DataFrame) -> str:
    """The training data in one value (paths, contents, labels): kept in every checkpoint."""
    rows = photos[["path", "digest", "label"]].sort_values("path").to_csv(index=False)
    return hashlib.sha1(rows.encode()).hexdigest()[:16]


def continued_photos(args: argparse.Namespace, frame: pd.DataFrame, data_dir: Path,
                     say=print) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """--resume: today's photos checked against the run's photos.csv. Photos added, removed or
    changed (content or label) since the run started are named and refused, unless
    --accept_data_change: then the run goes on with the photos it still has (new people are left
    out). Returns (the frame to continue on, the recorded photos) — (frame, None) for a run of an
    earlier version without photos.csv, whose k-fold folds.csv still decides who validates where."""
    run_dir = Path(args.resume)
    recorded_file = run_dir / PHOTOS
    if not recorded_file.is_file():
        say(f"warning: {run_dir} has no {PHOTOS} (a run of an earlier version): today's data "
            "cannot be checked against what it trained on")
        return frame, None
    # every cell as text: a hex digest such as '12e4...' must not turn into a number
    recorded = read_csv_checked(recorded_file, ["path", "profile", "label", "digest", "role"],
                                dtype=str)
    recorded["label"] = check_labels(recorded["label"], str(recorded_file), "label")
    today = photo_record(frame, data_dir, roles=None)
    before, now = recorded.set_index("path"), today.set_index("path")
    added = now.index.difference(before.index)
    removed = before.index.difference(now.index)
    both = now.index.intersection(before.index)
    changed = both[(now.loc[both, "digest"] != before.loc[both, "digest"])
                   | (now.loc[both, "label"] != before.loc[both, "label"])]
    differences = [f"{len(paths)} photo(s) {what} (first: {paths[0]})"
                   for what, paths in (("added", added), ("removed", removed),
                                       ("changed in content or label", changed)) if len(paths)]
    if differences and not args.accept_data_change:
        raise UserError(f"--resume {run_dir}: the training data changed since the run started: "
                        f"{'; '.join(differences)}; add --accept_data_change to go on with the "
                        "photos the run still has (new ones left out), or start a new run")
    if differences:
        say(f"warning: --accept_data_change: {'; '.join(differences)}; the run goes on with the "
            "photos it still has")
    keep = today["path"].isin(before.index).to_numpy()
    return frame[keep].reset_index(drop=True), recorded.set_index("path").loc[today["path"][keep]]
