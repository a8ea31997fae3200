"""Every run folder in one table (experiments.py table): each run's flags, its best val macro F1
or out-of-fold F1, per-head F1, speed and wall time, its latest leaderboard score and note, the
commit it started from and its path, read from the small files of its folder (config.json,
summary.csv, done.json, folds.csv, oof_metrics.json, note.json), never its checkpoints; a
half-written folder is listed with what it lacks, a tune.py study's folder by its trials.
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from maskface import run_folder
from maskface.cli import UserError
from maskface.files import read_csv_checked, read_json_checked
from maskface.selection import folds_fingerprint

RUN_FILES = (run_folder.CONFIG, run_folder.SUMMARY, run_folder.BEST, run_folder.FOLDS, run_folder.OOF)


# columns every table has; the flags that differ between the runs shown go after "folds"
FIXED_COLUMNS = ["run", "kind", "model", "category", "size", "crop", "folds"]


METRIC_COLUMNS = ["epochs", "val_f1", "oof_f1", "f1_mask", "f1_gender", "f1_age",
                  "images_per_s", "wall_s", "status"]


# experiments.py note's latest leaderboard score and text; the code a run started from (short
# hash, * when the tree had uncommitted changes); its folder relative to the current one
TRACKING_COLUMNS = ["lb", "note", "commit", "path"]
NOTE_WIDTH = 40  # characters of a note the text table shows (the CSV keeps it whole)


# settings that are columns of their own, bookkeeping, or differ by construction (--folds)
NOT_COMPARED = {"name", "model_dir", "cache_dir", "config", "resume", "fold", "log_interval",
                "log_seconds", "progress",
                "num_workers", "model", "category", "resize", "crop", "epochs", "kfold", "folds",
                run_folder.RUN_ID, run_folder.TRACKING}


HEADS = ("f1_mask", "f1_gender", "f1_age")


def is_run_dir(path: Path) -> bool:
    return any((path / name).exists() for name in RUN_FILES) or any(path.glob("fold[0-9]*"))


def is_study_dir(path: Path) -> bool:
    return not is_run_dir(path) and any((path / name).is_file()
                                        for name in ("study.db", "trials.csv"))


def find_runs(paths: list[str], pattern: str | None = None) -> list[tuple[str, Path]]:
    """(name, folder) of every run: a path that is a run folder, or each folder inside a model
    dir (an empty or half-written one too: the table says what it lacks; a tune.py study's
    folder: its trials). Hidden folders are skipped unless they are run folders; ``pattern`` (a
    glob) filters on the name."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise UserError(f"{path}: no such folder; expected a model dir or a run folder")
        if is_run_dir(path):
            found.append(path)
        else:
            # hidden folders only when they are run folders (--name .baseline): the temp folders
            # of killed runs and caches (.cache, .exp.tmp-*) are not runs
            found += sorted(d for d in path.iterdir() if d.is_dir() and (
                not d.name.startswith(".") or is_run_dir(d)))
            # a tune.py study's folder in a model dir stands for its trials, which are runs
            studies = [d for d in found if is_study_dir(d)]
            found = [d for d in found if d not in studies] + [
                t for d in studies for t in sorted(d.iterdir()) if t.is_dir() and is_run_dir(t)]
    names = [d.name for d in found]
    runs = [(name if names.count(name) == 1 else str(d), d) for name, d in zip(names, found)]
    if pattern:
        runs = [(name, d) for name, d in runs if fnmatch.fnmatch(name, pattern)]
    if not runs:
        where = ", ".join(paths) + (f" matching --filter {pattern}" if pattern else "")
        raise UserError(f"no run folders in {where}; expected folders written by train.py")
    return runs


def read_summary(path: Path, problems: list[str]) -> pd.DataFrame | None:
    """summary.csv as numbers; a missing or torn one is a problem of the row, not an error."""
    if not path.is_file():
        fold = f"{path.parent.name}/" if path.parent.name.startswith("fold") else ""
        problems.append(f"no {fold}summary.csv")
        return None
    try:
        table = read_csv_checked(path, ["epoch", "val_f1", "images_per_s"])
    except UserError as why:
        reason = str(why).split(": ", 1)[-1].split("; ")[0]  # the path is the row's already
        problems.append(f"unreadable {path.name} ({reason})")
        return None
    return table.apply(pd.to_numeric, errors="coerce")


def read_small_json(path: Path, problems: list[str]) -> dict | None:
    if not path.is_file():
        return None
    try:
        return read_json_checked(path)
    except UserError:
        problems.append(f"unreadable {path.name}")
        return None


def int_setting(settings: dict, key: str) -> int | None:
    """A positive whole-number setting of config.json; None when absent or hand-edited wrong."""
    value = settings.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def best_of(summary: pd.DataFrame | None) -> dict:
    """Best val F1 of one model (its weights' or, with --model_ema, its EMA's: what best.pth
    kept) and that epoch's per-head F1 (the weights' only); images/s over its epochs."""
    if summary is None or summary["val_f1"].isna().all():
        return {}
    kept = summary["val_f1"]
    if "val_f1_ema" in summary:
        kept = np.fmax(kept, summary["val_f1_ema"])
    best = summary.loc[kept.idxmax()]
    heads = {h: best[h] for h in HEADS if h in summary and not pd.isna(best[h])}
    return {"val_f1": kept.max(), "images_per_s": summary["images_per_s"].mean(),
            **(heads if best["val_f1"] == kept.max() else {})}


def single_run_row(run_dir: Path, settings: dict, problems: list[str]) -> dict:
    summary = read_summary(run_dir / run_folder.SUMMARY, problems)
    done = read_small_json(run_dir / run_folder.DONE, problems)
    row = {"kind": "single", **best_of(summary)}
    done_epochs = 0 if summary is None else len(summary)
    row["epochs"] = f"{done_epochs}/{int_setting(settings, 'epochs') or '?'}"
    if not (run_dir / run_folder.BEST).is_file():
        problems.append("no best.pth")
    row["wall_s"] = (done or {}).get("wall_s")
    if done is None and not problems:
        problems.append(f"unfinished at epoch {done_epochs} (train.py --resume {run_dir})")
    return row


def kfold_row(run_dir: Path, settings: dict, problems: list[str]) -> dict:
    fold_dirs = [d for d in run_dir.glob("fold[0-9]*") if d.name[4:].isdigit()]
    n_folds = int_setting(settings, "kfold") or len(fold_dirs)
    folds_csv = run_dir / run_folder.FOLDS
    row: dict = {"kind": f"{n_folds}-fold"}
    if folds_csv.is_file():
        try:
            row["folds"] = folds_fingerprint(folds_csv)[:8]
        except UserError:
            problems.append("unreadable folds.csv")
    else:
        problems.append("no folds.csv")
    bests, walls, epochs, finished = [], [], 0, 0
    for fold in range(n_folds):
        fold_dir = run_folder.fold_dir(run_dir, fold)
        summary = read_summary(fold_dir / run_folder.SUMMARY, problems) if fold_dir.is_dir() else None
        epochs += 0 if summary is None else len(summary)
        bests.append(best_of(summary))
        done = read_small_json(fold_dir / run_folder.DONE, problems)
        finished += done is not None
        walls.append((done or {}).get("wall_s"))
        if fold_dir.is_dir() and not (fold_dir / run_folder.BEST).is_file():
            problems.append(f"no fold{fold}/best.pth")
    row["epochs"] = f"{epochs}/{n_folds * (int_setting(settings, 'epochs') or 0) or '?'}"
    scored = [b for b in bests if b]
    if scored:
        row["val_f1"] = float(np.mean([b["val_f1"] for b in scored]))
        row["images_per_s"] = float(np.mean([b["images_per_s"] for b in scored]))
    if walls and all(w is not None for w in walls):
        row["wall_s"] = float(sum(walls))
    oof = read_small_json(run_dir / run_folder.OOF_METRICS, problems)
    if oof:
        row.update({"oof_f1": oof.get("f1"), **{h: oof.get(h) for h in HEADS if h in oof}})
    if not (run_dir / run_folder.OOF).is_file():
        problems.append(f"no oof.csv ({finished}/{n_folds} folds done)")
    elif run_folder.TRACKING in settings and not (run_dir / run_folder.DONE).is_file():
        # a run of a version that writes done.json (after oof.csv and the figures) lacks it
        problems.append(f"no done.json: its reports were cut short (train.py --resume {run_dir})")
    return row


def run_row(name: str, run_dir: Path) -> tuple[dict, dict]:
    """(table row, the run's settings) of one run folder, however incomplete."""
    problems: list[str] = []
    settings = read_small_json(run_dir / run_folder.CONFIG, problems)
    if settings is None and not problems:
        problems.append("no config.json")
    settings = settings or {}
    kfold = bool(settings.get("kfold") or settings.get("folds") or (run_dir / run_folder.FOLDS).exists()
                 or any(run_dir.glob("fold[0-9]*")))
    row = {"run": name, "model": settings.get("model"), "category": settings.get("category")}
    if not settings and not kfold:
        row["kind"] = "?"
    if isinstance(settings.get("resize"), list):
        row["size"] = "x".join(map(str, settings["resize"]))
    name = settings.get("augmentation")
    from maskface.augmentation import AUGMENTATIONS  # torch: not for --help
    spec = AUGMENTATIONS.get(name) if isinstance(name, str) else None
    row["crop"] = settings.get("crop") or (spec.crop if spec else None)
    row = {**(kfold_row(run_dir, settings, problems) if kfold
              else single_run_row(run_dir, settings, problems)), **row}
    # tune.py's marks: a trial its pruner stopped, or whose worker died (then not a result)
    marks = [mark for file, mark in (("pruned.json", "pruned by tune.py"),
                                     ("failed.json", "failed: its tune.py worker stopped"))
             if (run_dir / file).is_file()]
    row.update(tracking_cells(run_dir, settings, problems))
    row["status"] = "; ".join(marks + problems) if marks or problems else "done"
    return row, settings


def tracking_cells(run_dir: Path, settings: dict, problems: list[str]) -> dict:
    """The lb, note, commit and path cells of a run's row."""
    try:
        cells = run_folder.latest_note(run_folder.read_notes(run_dir))
    except UserError:
        problems.append(f"unreadable {run_folder.NOTE}")
        cells = {}
    tracking = settings.get(run_folder.TRACKING)
    commit = tracking.get("commit") if isinstance(tracking, dict) else None
    if isinstance(commit, str) and commit:
        cells["commit"] = commit[:7] + ("*" if tracking.get("dirty") else "")
    try:
        cells["path"] = os.path.relpath(run_dir)
    except ValueError:  # another drive (Windows): no relative path
        cells["path"] = str(run_dir)
    return cells


def shown_setting(value) -> str:
    if isinstance(value, list):
        return "x".join(map(str, value))
    return "-" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def experiment_table(runs: list[tuple[str, Path]]) -> pd.DataFrame:
    """One row per run; the settings that differ between these runs get a column each."""
    rows, settings = zip(*(run_row(name, run_dir) for name, run_dir in runs))
    keys = sorted({k for s in settings for k in s} - NOT_COMPARED)
    # a setting missing from a config.json (half-written, or older) is no difference
    differing = [k for k in keys if len({json.dumps(s[k], sort_keys=True) for s in settings
                                         if k in s}) > 1]
    for row, s in zip(rows, settings):
        row.update({k: shown_setting(s[k]) for k in differing if k in s})
    return pd.DataFrame(list(rows), columns=FIXED_COLUMNS + differing + METRIC_COLUMNS
                        + TRACKING_COLUMNS)


def sort_table(table: pd.DataFrame, column: str, reverse: bool = False) -> pd.DataFrame:
    """Numbers largest first, text A-Z (``reverse`` flips); blanks last either way."""
    if column not in table.columns:
        raise UserError(f"--sort {column}: no such column; expected one of "
                        f"{', '.join(table.columns)}")
    values = pd.to_numeric(table[column], errors="coerce")
    numeric = values.notna().any() and column not in ("run", "epochs")
    ascending = (not numeric) != reverse
    key = values if numeric else table[column].astype("string")
    order = key.sort_values(ascending=ascending, na_position="last", kind="stable").index
    return table.loc[order].reset_index(drop=True)


DIGITS = {"val_f1": 4, "oof_f1": 4, "lb": 4, "f1_mask": 4, "f1_gender": 4, "f1_age": 4,
          "images_per_s": 0, "wall_s": 0}


def render(table: pd.DataFrame) -> str:
    """The table as aligned text: metrics right-aligned with fixed decimals, text left-aligned."""
    def cell(column: str, value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if column == "note":
            text = " ".join(str(value).split())  # one line per run
            return text if len(text) <= NOTE_WIDTH else text[:NOTE_WIDTH - 3] + "..."
        return f"{float(value):.{DIGITS[column]}f}" if column in DIGITS else str(value)

    columns = {c: [c] + [cell(c, v) for v in table[c]] for c in table.columns}
    widths = {c: max(map(len, cells)) for c, cells in columns.items()}
    lines = []
    for i in range(len(table) + 1):
        lines.append("  ".join(columns[c][i].rjust(widths[c]) if c in DIGITS
                               else columns[c][i].ljust(widths[c]) for c in table.columns))
    return "\n".join(line.rstrip() for line in lines)
