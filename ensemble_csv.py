"""Vote submission CSVs (ImageID,ans) into one, joined by ImageID: hard (weighted) or soft."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from maskface.cli import FlagParser, UserError, run_cli
from maskface.ensemble import aligned_matrix, calibrated_predictions, hard_vote, soft_vote
from maskface.files import check_output_path, read_csv_checked, write_together
from maskface.labels import PROB_COLUMNS, check_labels, check_probabilities
from maskface.scores import check_answers, print_scores, score_answers
from maskface.selection import read_selection_json, selection_offsets

DEFAULT_DIR = Path("output")
PROBS_SUFFIX = "_probs.csv"


def _read_table(path: Path, columns: list[str]) -> pd.DataFrame:
    table = read_csv_checked(path, ["ImageID", *columns])
    if table.empty:
        raise UserError(f"{path}: no rows")
    ids = table["ImageID"]
    if ids.isna().any():
        raise UserError(f"{path}: empty ImageID in row {int(ids.isna().to_numpy().argmax()) + 2}")
    duplicated = ids[ids.duplicated()]
    if len(duplicated):
        raise UserError(f"{path}: {len(duplicated)} duplicated ImageID(s) "
                        f"(first: {duplicated.iloc[0]})")
    return table.set_index("ImageID")


def _image_ids(table: pd.DataFrame) -> list[str]:
    return [f"ImageID {image_id}" for image_id in table.index]


def read_predictions(path: Path) -> pd.Series:
    """A submission CSV -> its ans (int 0..17) indexed by ImageID; UserError naming the file."""
    table = _read_table(path, ["ans"])
    answers = check_labels(table["ans"], str(path), "ans", row_names=_image_ids(table))
    return pd.Series(answers, index=table.index, name="ans")


def read_probabilities(path: Path) -> pd.DataFrame:
    """A probability CSV (ImageID, p0..p17) -> float table indexed by ImageID, rows checked."""
    table = _read_table(path, PROB_COLUMNS)
    values = check_probabilities(table, str(path), row_names=_image_ids(table))
    return pd.DataFrame(values, index=table.index, columns=PROB_COLUMNS)


def check_same_ids(tables: list[pd.Series] | list[pd.DataFrame], paths: list[Path]) -> None:
    """Every file must hold exactly the first file's ImageIDs (rows are joined by ImageID)."""
    first_ids, first = tables[0].index, paths[0]
    for table, path in zip(tables[1:], paths[1:]):
        extra = table.index[~table.index.isin(first_ids)]
        if len(extra):
            raise UserError(f"{path}: {len(extra)} ImageIDs not in {first} (first: {extra[0]})")
        missing = first_ids[~first_ids.isin(table.index)]
        if len(missing):
            raise UserError(f"{path}: lacks {len(missing)} ImageIDs of {first} "
                            f"(first: {missing[0]})")


def find_inputs(output: Path, probs_output: Path | None, soft: bool) -> list[Path]:
    """No files given: the CSVs in ./output (probability files when --soft), minus our outputs."""
    ours = {output.resolve()} | ({probs_output.resolve()} if probs_output else set())
    found = [path for path in sorted(DEFAULT_DIR.glob("*.csv"))
             if path.resolve() not in ours and path.name.endswith(PROBS_SUFFIX) == soft]
    kind = f"*{PROBS_SUFFIX} probability" if soft else "submission"
    names = ", ".join(path.name for path in found)
    print(f"using {len(found)} {kind} file(s) from {DEFAULT_DIR}/: {names}")
    return found


def check_inputs(paths: list[Path], weights: list[float] | None, outputs: list[Path],
                 minimum: int = 2) -> None:
    if len(paths) < minimum:
        raise UserError(f"need at least {minimum} CSV files to vote, got {len(paths)}")
    seen: dict[Path, Path] = {}
    for path in paths:
        if path.resolve() in seen:
            raise UserError(f"{path}: given twice (same file as {seen[path.resolve()]})")
        seen[path.resolve()] = path
    for output in outputs:
        if output.resolve() in seen:
            raise UserError(f"{output}: is both an input and an output")
    if len({output.resolve() for output in outputs}) < len(outputs):
        raise UserError(f"{outputs[-1]}: --output and --probs_output name the same file")
    if weights is not None:
        if len(weights) != len(paths):
            raise UserError(f"--weights: {len(weights)} weight(s) for {len(paths)} files")
        if not all(math.isfinite(w) and w > 0 for w in weights):
            raise UserError("--weights: must be positive numbers, got "
                            + " ".join(f"{w:g}" for w in weights))


def selection_weights(path: Path, paths: list[Path]) -> tuple[list[float], np.ndarray | None,
                                                               list[str]]:
    """--weights_file: (one weight per file, the calibration offsets, member names) of a selection
    file of experiments.py select; its members and the files pair up in order."""
    selection = read_selection_json(path)
    members = selection["members"]
    names = ["+".join(member["runs"]) for member in members]
    if len(members) != len(paths):
        raise UserError(f"--weights_file {path}: {len(members)} member(s) ({', '.join(names)}) "
                        f"but {len(paths)} probability file(s); give one per member, in that order")
    return ([member["weight"] for member in members],
            selection_offsets(selection), names)


def main(args: argparse.Namespace) -> pd.DataFrame:
    """Vote the files named by ``args`` and write the result; returns it (ImageID, ans)."""
    if args.probs_output and not args.soft:
        raise UserError("--probs_output needs --soft (hard votes have no probabilities)")
    if args.weights_file and not args.soft:
        raise UserError("--weights_file needs --soft (a selection weighs probabilities)")
    if args.weights_file and args.weights:
        raise UserError("give --weights or --weights_file, not both")
    # both outputs checked before any input is read: neither is written when one cannot be
    output = check_output_path(args.output, "--output")
    probs_output = (check_output_path(args.probs_output, "--probs_output")
                    if args.probs_output else None)
    answers_path = Path(args.answers) if args.answers else None
    if answers_path and answers_path.resolve() in {output.resolve()} | (
            {probs_output.resolve()} if probs_output else set()):
        raise UserError(f"--answers {answers_path}: is also an output")
    paths = [Path(p) for p in args.files] or find_inputs(output, probs_output, args.soft)
    # a selection of one run is still worth applying: its calibration offsets
    check_inputs(paths, args.weights, [output] + ([probs_output] if probs_output else []),
                 minimum=1 if args.weights_file else 2)
    weights, offsets, members = args.weights, None, None
    if args.weights_file:
        weights, offsets, members = selection_weights(Path(args.weights_file), paths)
        offsets = None if args.no_calibrate else offsets
    reader = read_probabilities if args.soft else read_predictions
    tables = [reader(path) for path in paths]
    check_same_ids(tables, paths)
    answers = None
    if answers_path:  # checked before the vote is written: a bad file leaves nothing behind
        if answers_path.resolve() in {path.resolve() for path in paths}:
            raise UserError(f"--answers {answers_path}: is also a file to vote")
        answers = read_csv_checked(answers_path, ["ImageID", "ans"])
        check_answers(answers, list(tables[0].index), str(answers_path), against=str(paths[0]))
    n_ties = None
    if args.soft:
        answer, mean_probs = soft_vote(tables, weights)
        if offsets is not None:  # the selection's per-class offsets, as inference applies them
            answer = pd.Series(calibrated_predictions(mean_probs.to_numpy(), offsets),
                               index=answer.index, name="ans")
        file_answers = aligned_matrix([table[PROB_COLUMNS] for table in tables]).argmax(axis=2)
    else:
        answer, n_ties = hard_vote(tables, weights)
        file_answers = aligned_matrix(tables)
    result = answer.rename_axis("ImageID").reset_index()
    outputs = {output: result.to_csv(index=False).encode()}
    if probs_output:
        probs = mean_probs.rename_axis("ImageID").reset_index()
        outputs[probs_output] = probs.to_csv(index=False).encode()
    write_together(outputs)  # the vote and its probabilities: both new or both as they were

    agreement = (file_answers == answer.to_numpy()).mean(axis=1)
    weights = weights or [1] * len(paths)
    mode = "soft" if args.soft else "hard"
    calibrated = ", calibrated by the selection's offsets" if offsets is not None else ""
    print(f"{mode} vote of {len(paths)} files, {len(result)} images{calibrated} -> {output}")
    for i, (path, weight, agrees) in enumerate(zip(paths, weights, agreement)):
        member = f" (member {members[i]})" if members else ""
        print(f"  {path}{member}  weight {weight:g}  agreement with the result {agrees:.4f}")
    if n_ties is not None:
        print(f"ties broken: {n_ties}")
    if answers is not None:  # the same report as inference.py --answers
        print_scores(score_answers(result, answers))
    return result


def get_args_parser() -> argparse.ArgumentParser:
    parser = FlagParser(
        description="Vote submission CSVs (ImageID,ans) into one. Rows are joined by ImageID; the "
                    "result keeps the first file's row order.",
        epilog="Tie rule: among the classes tied for the most (weighted) votes, the winner is the "
               "class predicted by the earliest file on the command line that predicted one of "
               "them. With no files: every *.csv in ./output, sorted by name, except the result "
               f"and *{PROBS_SUFFIX} (with --soft: only the *{PROBS_SUFFIX} files).")
    parser.add_argument("files", nargs="*", help="CSV files to vote (when none: see below)")
    parser.add_argument("-o", "--output", default=str(DEFAULT_DIR / "ensemble.csv"),
                        help="result CSV")
    parser.add_argument("--weights", type=float, nargs="+", default=None,
                        help="one positive weight per file, in order; put it after the files "
                             "(default: all 1)")
    parser.add_argument("--soft", action="store_true",
                        help="inputs are probability CSVs (ImageID, p0..p17): average, then argmax")
    parser.add_argument("--weights_file", default=None, metavar="SELECTION_JSON",
                        help="with --soft: the weights (and calibration offsets) of a selection "
                             "file of experiments.py select; the files are its members' "
                             "probability CSVs, in the file's member order")
    parser.add_argument("--no_calibrate", action="store_true",
                        help="with --weights_file: ignore the selection's calibration offsets")
    parser.add_argument("--answers", default=None, metavar="FILE",
                        help="CSV ImageID,ans with the truth (the eval set's answers): print the "
                             "vote's macro F1, accuracy, per-head F1, per-class precision/recall/"
                             "F1/support and confusion, as inference.py --answers does")
    parser.add_argument("--probs_output", default=None,
                        help="with --soft: also write the mean probabilities (ImageID, p0..p17)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return get_args_parser().parse_args(argv)


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
