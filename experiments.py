"""From many runs to one submission: a table of every run, and the out-of-fold ensemble selection.

    python experiments.py table                                 # every run folder under ./model
    python experiments.py table model --sort oof_f1 --filter 'cv-*' --csv runs.csv
    python experiments.py select model/cv-a model/cv-b model/cv-c -o model/selection.json
    python inference.py --ensemble model/selection.json         # the submission, as selected
    python experiments.py note model/cv-a --lb 0.7421 --text "public LB, tta flip"

The table reads the small files of each run folder (config.json, summary.csv, done.json, folds.csv,
oof_metrics.json, note.json), never its checkpoints, and lists a half-written folder with what it
lacks (maskface/run_table.py). A note (a leaderboard score, a text) is kept in the run's note.json. Selection: see maskface/selection.py and `python experiments.py select --help`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from pathlib import Path

import pandas as pd

from maskface import run_folder, selection
from maskface.cli import FlagParser, UserError, run_cli
from maskface.files import atomic_write_text, check_output_path
from maskface.run_table import experiment_table, find_runs, render, sort_table

# ----------------------------------------------------------------------------------------------
# table (maskface/run_table.py) and select (maskface/selection.py)
# ----------------------------------------------------------------------------------------------
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
                                   calibrate=not args.no_calibrate, keep_mix=args.keep_mix)
    command = shlex.join(["python", "experiments.py", *sys.argv[1:]]) \
        if Path(sys.argv[0]).name == "experiments.py" else "experiments.select"
    document = selection.selection_document(result, output, command)
    atomic_write_text(output, json.dumps(document, indent=2))
    print(f"wrote {output}: python inference.py --ensemble {output}")
    return {**result, "output": output, "document": document}


# ----------------------------------------------------------------------------------------------
# note
# ----------------------------------------------------------------------------------------------
def note_main(args: argparse.Namespace) -> list[dict]:
    """Add a leaderboard score and/or a text to a run's note.json (the table shows the latest)."""
    run_dir = Path(args.run)
    if not (run_dir / run_folder.CONFIG).is_file():
        raise UserError(f"{run_dir}: not a run folder (no {run_folder.CONFIG} there); expected a "
                        "folder written by train.py")
    if args.lb is None and args.text is None:
        raise UserError("note: give --lb SCORE, --text TEXT or both")
    if args.lb is not None and not (math.isfinite(args.lb) and 0 <= args.lb <= 1):
        raise UserError(f"--lb {args.lb}: expected a macro F1 score from 0 to 1")
    text = None if args.text is None else " ".join(args.text.split())  # one line in the table
    if args.text is not None and not text:
        raise UserError("--text: empty; expected a few words about the run")
    notes = run_folder.add_note(run_dir, args.lb, text)
    print(f"{run_dir / run_folder.NOTE}: note {len(notes)}"
          + (f", lb {args.lb:.4f}" if args.lb is not None else "")
          + (f": {text}" if text else ""))
    return notes


# ----------------------------------------------------------------------------------------------
# Flags and main
# ----------------------------------------------------------------------------------------------
def get_args_parser() -> FlagParser:
    parser = FlagParser(description="A table of runs, and the out-of-fold ensemble selection. "
                                    "Every flag is also accepted with hyphens (--split-repeats).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{table,select,note}")
    table = commands.add_parser(
        "table", help="one row per run folder: settings that differ, F1, speed, wall time",
        description="One row per run folder (k-fold, per-category and half-written ones "
                    "included): model, category, size, crop, folds (a fingerprint of folds.csv: "
                    "runs with the same one can be selected together), the settings that "
                    "differ between the runs shown, epochs done/asked, best val macro F1 (mean "
                    "over folds), OOF macro F1, per-head F1 (OOF for k-fold runs, the best val "
                    "epoch's for single runs), training images/s, wall time of the epochs "
                    "(summed over folds), what a run lacks, the latest leaderboard score and "
                    "note (experiments.py note), the commit it started from (7 characters, * "
                    "when the tree had uncommitted changes) and its folder relative to the "
                    "current one.")
    table.add_argument("dirs", nargs="*", default=[os.environ.get("SM_MODEL_DIR", "./model")],
                       metavar="DIR", help="model dirs (their run folders) or run folders "
                                           "(default: $SM_MODEL_DIR, else ./model)")
    table.add_argument("--sort", default="run", metavar="COLUMN",
                       help="sort by this column: numbers largest first, text A-Z (e.g. oof_f1, "
                            "lb)")
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
                    "best single run chosen on the same half; when its verdict says the mix's gain (or "
                    "the calibration's) does not hold, the file holds what it recommends instead "
                    "(and says so in \"verdict\"), unless --keep_mix. Writes a selection JSON "
                    "(run paths relative to it) for inference.py --ensemble FILE and "
                    "ensemble_csv.py --soft --weights_file FILE.")
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
    pick.add_argument("--keep_mix", action="store_true",
                      help="write the selected mix and its calibration even when the split-half "
                           "verdict does not hold them (by default the file then holds what the "
                           "verdict recommends: the best single run alone, no calibration)")
    note = commands.add_parser(
        "note", help="record a leaderboard score and/or a note for a run",
        description="Append a leaderboard score and/or a note to RUN/note.json (every note is "
                    "kept, stamped UTC); the table shows the latest score (column lb, --sort lb) "
                    "and the latest note.")
    note.add_argument("run", metavar="RUN", help="a run folder (written by train.py)")
    note.add_argument("--lb", type=float, default=None, metavar="SCORE",
                      help="the leaderboard's macro F1 of this run's submission, 0 to 1")
    note.add_argument("--text", default=None, help="a note, e.g. what was submitted")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return get_args_parser().parse_args(argv)


def main(args: argparse.Namespace):
    return {"table": table_main, "select": select_main, "note": note_main}[args.command](args)


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
