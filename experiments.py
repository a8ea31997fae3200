"""From many runs to one submission: a table of every run, and the out-of-fold ensemble selection.

    python experiments.py table                                 # every run folder under ./model
    python experiments.py table model --sort oof_f1 --filter 'cv-*' --csv runs.csv
    python experiments.py select model/cv-a model/cv-b model/cv-c -o model/selection.json
    python inference.py --ensemble model/selection.json         # the submission, as selected

The table reads the small files of each run folder (config.json, summary.csv, done.json, folds.csv,
oof_metrics.json), never its checkpoints, and lists a half-written folder with what it lacks.
Selection: see selection.py and `python experiments.py select --help`.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import shlex
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from maskface import run_folder, selection
from maskface.cli import FlagParser, UserError, run_cli
from maskface.files import atomic_write_text, check_output_path, read_csv_checked, read_json_checked

RUN_FILES = (run_folder.CONFIG, run_folder.SUMMARY, run_folder.BEST, run_folder.FOLDS, run_folder.OOF)
# columns every table has; the flags that differ between the runs shown go after "folds"
FIXED_COLUMNS = ["run", "kind", "model", "category", "size", "crop", "folds"]
METRIC_COLUMNS = ["epochs", "val_f1", "oof_f1", "f1_mask", "f1_gender", "f1_age",
                  "images_per_s", "wall_s", "status"]
# settings that are columns of their own, bookkeeping, or differ by construction (--folds)
NOT_COMPARED = {"name", "model_dir", "cache_dir", "config", "resume", "fold", "log_interval",
                "num_workers", "model", "category", "resize", "crop", "epochs", "kfold", "folds",
                run_folder.RUN_ID}
HEADS = ("f1_mask", "f1_gender", "f1_age")


# ----------------------------------------------------------------------------------------------
# Finding run folders
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# One row per run folder
# ----------------------------------------------------------------------------------------------
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
            row["folds"] = selection.folds_fingerprint(folds_csv)[:8]
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
    row["status"] = "; ".join(marks + problems) if marks or problems else "done"
    return row, settings


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
    return pd.DataFrame(list(rows), columns=FIXED_COLUMNS + differing + METRIC_COLUMNS)


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


DIGITS = {"val_f1": 4, "oof_f1": 4, "f1_mask": 4, "f1_gender": 4, "f1_age": 4,
          "images_per_s": 0, "wall_s": 0}


def render(table: pd.DataFrame) -> str:
    """The table as aligned text: metrics right-aligned with fixed decimals, text left-aligned."""
    def cell(column: str, value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{float(value):.{DIGITS[column]}f}" if column in DIGITS else str(value)

    columns = {c: [c] + [cell(c, v) for v in table[c]] for c in table.columns}
    widths = {c: max(map(len, cells)) for c, cells in columns.items()}
    lines = []
    for i in range(len(table) + 1):
        lines.append("  ".join(columns[c][i].rjust(widths[c]) if c in DIGITS
                               else columns[c][i].ljust(widths[c]) for c in table.columns))
    return "\n".join(line.rstrip() for line in lines)


def table_main(args: argparse.Namespace) -> pd.DataFrame:
    csv_path = check_output_path(args.csv, "--csv") if args.csv else None
    table = experiment_table(find_runs(args.dirs, args.filter))
    table = sort_table(table, args.sort, args.reverse)
    print(render(table))
    if csv_path:
        atomic_write_text(csv_path, table.to_csv(index=False, float_format="%.6g"))
        print(f"wrote {csv_path} ({len(table)} runs)")
    return table


# ----------------------------------------------------------------------------------------------
# select
# ----------------------------------------------------------------------------------------------
def selection_runs(paths: list[str], pattern: str | None) -> list[tuple[str, Path]]:
    """Run folders named one by one are taken as they are (and refused without oof.csv); in a
    model dir, the runs that are not k-fold runs with oof.csv are skipped, and said so."""
    runs = []
    for path in paths:
        found = find_runs([path], pattern)
        if len(found) == 1 and Path(path) == found[0][1]:
            runs += found
            continue
        usable = [(n, d) for n, d in found if (d / run_folder.OOF).is_file()]
        skipped = [n for n, d in found if (n, d) not in usable]
        if skipped:
            print(f"{path}: skipped {len(skipped)} run(s) without oof.csv (not finished k-fold "
                  f"runs): {', '.join(skipped)}")
        runs += usable
    if not runs:
        raise UserError(f"no finished k-fold runs (with oof.csv) in {', '.join(paths)}"
                        + (f" matching --filter {pattern}" if pattern else ""))
    names = [n for n, _ in runs]
    if len(set(names)) < len(names):  # the same name from two model dirs: name them by path
        runs = [(str(d), d) for _, d in runs]
    seen = [d.resolve() for _, d in runs]
    twice = sorted({str(d) for _, d in runs if seen.count(d.resolve()) > 1})
    if twice:
        raise UserError(f"{', '.join(twice)}: given more than once")
    return runs


def default_output(runs: list[tuple[str, Path]]) -> Path:
    """selection.json in the runs' common folder (as the user named it, when that is possible)."""
    try:
        common = os.path.commonpath([str(d.parent) for _, d in runs])
    except ValueError:  # absolute and relative paths mixed
        common = os.path.commonpath([str(d.resolve().parent) for _, d in runs])
    return Path(common) / "selection.json"


def select_main(args: argparse.Namespace) -> dict:
    for flag in ("steps", "patience"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: expected at least 1")
    if args.split_repeats < 0:
        raise UserError(f"--split_repeats {args.split_repeats}: expected 0 (off) or more")
    runs = selection_runs(args.runs, args.filter)
    output = Path(args.output) if args.output else default_output(runs)
    output = check_output_path(output, "--output")
    oof_runs = [selection.read_oof_run(run_dir, name) for name, run_dir in runs]
    result = selection.select_runs(oof_runs, steps=args.steps, patience=args.patience,
                                   repeats=args.split_repeats, seed=args.seed,
                                   calibrate=not args.no_calibrate)
    command = shlex.join(["python", "experiments.py", *sys.argv[1:]]) \
        if Path(sys.argv[0]).name == "experiments.py" else "experiments.select"
    document = selection.selection_document(result, output, command)
    atomic_write_text(output, json.dumps(document, indent=2))
    print(f"wrote {output}: python inference.py --ensemble {output}")
    return {**result, "output": output, "document": document}


# ----------------------------------------------------------------------------------------------
# Flags and main
# ----------------------------------------------------------------------------------------------
def get_args_parser() -> FlagParser:
    parser = FlagParser(description="A table of runs, and the out-of-fold ensemble selection. "
                                    "Every flag is also accepted with hyphens (--split-repeats).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{table,select}")
    table = commands.add_parser(
        "table", help="one row per run folder: settings that differ, F1, speed, wall time",
        description="One row per run folder (k-fold, per-category and half-written ones "
                    "included): model, category, size, crop, folds (a fingerprint of folds.csv: "
                    "runs with the same one can be selected together), the settings that "
                    "differ between the runs shown, epochs done/asked, best val macro F1 (mean "
                    "over folds), OOF macro F1, per-head F1 (OOF for k-fold runs, the best val "
                    "epoch's for single runs), training images/s, wall time of the epochs "
                    "(summed over folds), and what a run lacks.")
    table.add_argument("dirs", nargs="*", default=[os.environ.get("SM_MODEL_DIR", "./model")],
                       metavar="DIR", help="model dirs (their run folders) or run folders "
                                           "(default: $SM_MODEL_DIR, else ./model)")
    table.add_argument("--sort", default="run", metavar="COLUMN",
                       help="sort by this column: numbers largest first, text A-Z")
    table.add_argument("--reverse", action="store_true", help="flip the sort order")
    table.add_argument("--filter", default=None, metavar="GLOB",
                       help="only runs whose name matches, e.g. 'cv-*'")
    table.add_argument("--csv", default=None, metavar="FILE", help="also write the table as CSV")
    pick = commands.add_parser(
        "select", help="choose the weighted mix of k-fold runs with the best OOF macro F1",
        description="Greedy forward selection with replacement (Caruana et al. 2004) over "
                    "k-fold runs that share one folds.csv: each step adds the run (or mask+"
                    "gender+age trio of per-category runs) whose addition gives the mean "
                    "probability the best out-of-fold macro F1; a run added twice weighs twice. "
                    "It stops after --steps steps or --patience steps without gain and keeps the "
                    "best step (step 1 = the best single run, so the result never scores below "
                    "it on the OOF). Then per-class calibration offsets are fitted on the mix, and "
                    "a split-half check (select on half the people, score on the other half, "
                    "both ways, --split_repeats random halvings) prints the held-out gain over the "
                    "best single run chosen on the same half. Writes a selection JSON (run paths "
                    "relative to it) for inference.py --ensemble FILE and ensemble_csv.py --soft "
                    "--weights_file FILE.")
    pick.add_argument("runs", nargs="+", metavar="RUN_OR_MODEL_DIR",
                      help="k-fold run folders, or model dirs (their finished k-fold runs)")
    pick.add_argument("--filter", default=None, metavar="GLOB",
                      help="in model dirs, only runs whose name matches")
    pick.add_argument("-o", "--output", default=None, metavar="FILE",
                      help="selection JSON (default: selection.json in the runs' common folder)")
    pick.add_argument("--steps", type=int, default=selection.STEPS,
                      help="greedy steps at most")
    pick.add_argument("--patience", type=int, default=selection.PATIENCE,
                      help="stop after this many steps without a better OOF F1")
    pick.add_argument("--split_repeats", type=int, default=selection.SPLIT_REPEATS,
                      help="random halvings of the people for the split-half check (0: skip it)")
    pick.add_argument("--seed", type=int, default=0, help="seed of the halvings")
    pick.add_argument("--no_calibrate", action="store_true",
                      help="store no calibration offsets (the plain weighted vote)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return get_args_parser().parse_args(argv)


def main(args: argparse.Namespace):
    return table_main(args) if args.command == "table" else select_main(args)


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
