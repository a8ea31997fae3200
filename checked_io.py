"""What every script shares at its edges: one-line errors, flags, checked reads, atomic writes.

A bad input ends as one ``error: ...`` line naming the file or value (UserError + run_cli); every
file the toolkit writes appears whole or not at all (atomic_write_*); CSVs and JSON the user hands
in are checked cell by cell before any work. numpy and pandas only, so a script that just reads
and writes CSVs (ensemble_csv.py) starts without loading torch.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

NUM_CLASSES = 18  # the competition's classes; dataset.encode_class says how they are made
PROB_COLUMNS = [f"p{c}" for c in range(NUM_CLASSES)]  # a probability CSV: ImageID, p0..p17
SUM_TOLERANCE = 1e-3  # probabilities written with a few decimals do not sum to exactly 1
MAX_LISTED_PROBLEMS = 50  # more lines than this help nobody; the count of the rest is printed


class UserError(Exception):
    """A problem with the user's input (path, layout, CSV, name); scripts print it in one line."""


def problems_error(problems: list[str], what: str) -> UserError:
    """All the problems found in ``what`` at once: one line each (just the line when alone)."""
    if len(problems) == 1:
        return UserError(problems[0])
    shown = problems[:MAX_LISTED_PROBLEMS]
    more = len(problems) - len(shown)
    tail = [f"... and {more} more"] if more else []
    return UserError(f"{len(problems)} problem(s) in {what}:\n" + "\n".join(shown + tail))


def run_cli(main: Callable, parse_args: Callable, argv: list[str] | None = None) -> int:
    """Run a script's main: a UserError becomes one 'error: ...' line on stderr and exit code 2."""
    try:
        main(parse_args(argv))
    except UserError as why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    except OSError as why:  # disk full, permissions, a path of the wrong kind: name it, no traceback
        where = f"{why.filename}: " if why.filename else ""
        print(f"error: {where}{why.strerror or why}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


# ----------------------------------------------------------------------------------------------
# Flags: --flag-name and --flag_name alike, each listed and each default shown once
# ----------------------------------------------------------------------------------------------
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends '(default: X)' where it says something: not for None, False or a help text that
    already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


class FlagParser(argparse.ArgumentParser):
    """An ArgumentParser that takes ``--flag-name`` for ``--flag_name`` (only the underscore form
    is listed in --help) and silently maps ``aliases`` (old spellings) to their flag."""

    def __init__(self, *args, aliases: dict[str, str] | None = None, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.aliases = dict(aliases or {})

    def parse_known_args(self, args: Sequence[str] | None = None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([self._canonical(a) for a in args], namespace)

    def _canonical(self, arg: str) -> str:
        if not arg.startswith("--") or arg == "--":
            return arg
        flag, equals, value = arg.partition("=")
        if flag not in self._option_string_actions:
            underscored = "--" + flag[2:].replace("-", "_")
            flag = self.aliases.get(underscored, underscored)
            if flag not in self._option_string_actions:  # unknown: argparse says so, as typed
                return arg
        return flag + equals + value


# ----------------------------------------------------------------------------------------------
# Writing: whole files or nothing
# ----------------------------------------------------------------------------------------------
def file_mode() -> int:
    """The permissions open() gives a new file under this process's umask (read now: os.umask
    is the only way to read it, and the caller may have changed it)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _write_temp(path: Path, data: bytes) -> str:
    """``data`` in a synced temp file beside ``path``, with the umask's permissions; returns its
    name. An OSError names ``path`` (a full disk's write error carries no file name of its own)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # while it is written: not a killed run's (remove_stale_temps)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; give what open() would have
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and not error.filename:
            raise OSError(error.errno, error.strerror, str(path)) from None
        raise
    return tmp


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file so that readers see either the old or the complete new content."""
    tmp = _write_temp(Path(path), data)
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _journal(first: Path) -> Path:
    return first.with_name(f".{first.name}.together.json")


def write_together(files: dict[Path, bytes]) -> None:
    """Write files that belong together (a submission and its probabilities) so that either all
    are new or all are the old ones: every file goes to a temp file first (a full disk or any
    error there leaves the old files alone), then a journal lists the renames and the temps replace
    the files. A kill between two renames leaves the journal, and the next write of the same files
    (or finish_pending_writes) completes the renames before anything else."""
    paths = [Path(p) for p in files]
    finish_pending_writes(paths[0])
    temps: list[str] = []
    try:
        for path in paths:
            temps.append(_write_temp(path, files[path]))
        atomic_write_text(_journal(paths[0]),
                          json.dumps([[tmp, str(path)] for tmp, path in zip(temps, paths)]))
    except BaseException:
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)
        raise
    finish_pending_writes(paths[0])


def finish_pending_writes(first: str | Path) -> None:
    """Complete the renames of an interrupted write_together whose first file is ``first``."""
    journal = _journal(Path(first))
    try:
        renames = json.loads(journal.read_text())
    except FileNotFoundError:
        return
    except ValueError:  # torn by a crash while it was written: no rename had started
        renames = []
    for tmp, path in renames:
        if Path(tmp).exists():
            os.replace(tmp, path)
    journal.unlink(missing_ok=True)


STALE_TEMP_AGE_S = 60  # a temp file this old whose writer holds no lock on it is a killed run's


def remove_stale_temps(folder: Path, pattern: str) -> None:
    """Remove temp files (or folders, locked through their .lock) matching ``pattern`` that a
    killed run left: a live writer holds an exclusive flock on them (lock_temp), which the kernel
    releases when the writer dies, however it dies."""
    if not folder.is_dir():
        return
    now = time.time()
    for temp in folder.glob(pattern):
        try:
            if now - temp.lstat().st_mtime < STALE_TEMP_AGE_S:
                continue  # perhaps still being created: its writer may not hold the lock yet
            lock = temp / ".lock" if temp.is_dir() else temp
            if lock.exists():
                with open(lock, "rb") as f:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a live writer's: OSError
            if temp.is_dir():
                shutil.rmtree(temp)
            else:
                temp.unlink()
        except OSError:
            continue


def lock_temp(path: str | Path):
    """An open handle holding an exclusive flock on ``path`` for as long as it is open: marks a
    temp file as being written, so remove_stale_temps leaves it alone."""
    handle = open(path, "rb")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def file_inside(value: str, folder: str | Path, where: str) -> Path:
    """The file a CSV cell names inside ``folder``: a relative path (or an absolute one within the
    folder) that never climbs out of it with '..'; UserError naming the cell otherwise."""
    folder = Path(os.path.normpath(os.path.abspath(folder)))
    candidate = Path(value)
    inside = not candidate.is_absolute() and ".." not in candidate.parts
    if candidate.is_absolute():
        resolved = Path(os.path.normpath(value))
        inside = resolved == folder or folder in resolved.parents
        candidate = resolved
    if not inside or not str(value).strip():
        raise UserError(f"{where}: {value!r} is not a file inside {folder} (absolute paths "
                        "elsewhere and '..' are refused)")
    return candidate if candidate.is_absolute() else folder / candidate


def check_output_path(path: str | Path, flag: str, folder: bool = False) -> Path:
    """Fail before any work when ``path`` cannot be written as a file (or, with ``folder``, made
    a folder): it exists as the other kind, or something on its way is a file."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: is a file; expected a folder")
    if not folder and path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; expected a file name")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
            break
    return path


# ----------------------------------------------------------------------------------------------
# Reading: the user's CSV and JSON files, checked before any work
# ----------------------------------------------------------------------------------------------
def read_csv_checked(path: str | Path, columns: list[str], dtype=None) -> pd.DataFrame:
    """pd.read_csv that fails with one line naming the file when it is missing or lacks columns;
    ImageIDs stay text (``dtype`` str: every cell does, for cell-by-cell checks)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; expected a CSV file")
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        table = pd.read_csv(path, dtype=dtype or {"ImageID": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as why:
        raise UserError(f"{path}: not a readable CSV ({str(why).splitlines()[0]})") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; "
                        f"expected {', '.join(columns)}, found {', '.join(map(str, table.columns))}")
    return table


def read_json_checked(path: str | Path) -> dict:
    """Load a JSON object, failing with one line naming the file."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder; expected a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as why:
        raise UserError(f"{path}: not valid JSON ({why})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object of settings")
    return value


def shown_cell(value: object) -> str:
    """A CSV cell as the user wrote it, for error messages: 'empty' for a blank one, 18 rather
    than np.int64(18)."""
    if pd.isna(value):
        return "empty"
    return repr(value.item() if isinstance(value, np.generic) else value)


def csv_line_names(n_rows: int) -> list[str]:
    """'line 2', 'line 3', ...: how a row of a CSV with a header is named in an error."""
    return [f"line {row + 2}" for row in range(n_rows)]


def check_labels(values: pd.Series, where: str, column: str = "ans",
                 row_names: Sequence[str] | None = None) -> np.ndarray:
    """Class labels as int64; UserError naming the first bad row (by ``row_names``, else its CSV
    line) and its cell when any is not an integer 0..17."""
    numbers = pd.to_numeric(values, errors="coerce")
    bad = (numbers.isna() | (numbers % 1 != 0) | (numbers < 0) | (numbers >= NUM_CLASSES)).to_numpy()
    if bad.any():
        row = int(bad.argmax())
        name = (row_names[row] if row_names is not None else csv_line_names(len(values))[row])
        raise UserError(f"{where}: {int(bad.sum())} {column} value(s) not an integer "
                        f"0..{NUM_CLASSES - 1} (first: {name}, "
                        f"{column}={shown_cell(values.iloc[row])})")
    return numbers.to_numpy(dtype=np.int64)


def check_probabilities(table: pd.DataFrame, where: str,
                        row_names: Sequence[str] | None = None,
                        columns: Sequence[str] = PROB_COLUMNS) -> np.ndarray:
    """The p0..p17 columns (or ``columns``: p0..p2 of a per-category run) as float64 [N, 18];
    UserError naming the first bad row (by ``row_names``, else its CSV line) when a cell is not
    a number in [0, 1] or a row does not sum to 1 (logits or a truncated file would otherwise
    vote silently)."""
    names = row_names if row_names is not None else csv_line_names(len(table))
    columns = list(columns)
    values = table[columns].apply(pd.to_numeric, errors="coerce").to_numpy(
        dtype=np.float64, na_value=np.nan)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        row, column = np.argwhere(bad)[0]
        name = columns[column]
        raise UserError(f"{where}: {int(bad.sum())} {columns[0]}..{columns[-1]} value(s) not a "
                        f"number in [0, 1] (first: {names[row]}, "
                        f"{name}={shown_cell(table[name].iloc[row])})")
    sums = values.sum(axis=1)
    bad_sums = np.abs(sums - 1) > SUM_TOLERANCE
    if bad_sums.any():
        row = int(bad_sums.argmax())
        raise UserError(f"{where}: {int(bad_sums.sum())} row(s) whose {columns[0]}..{columns[-1]} "
                        f"do not sum to 1 (first: {names[row]}, sum {sums[row]:.4f})")
    return values


def calibrated_predictions(probs: np.ndarray, offsets: np.ndarray | None) -> np.ndarray:
    """argmax of the probabilities, or of log p + per-class offsets when calibrated."""
    if offsets is None:
        return probs.argmax(1)
    return (np.log(np.clip(probs, 1e-12, None)) + offsets).argmax(1)


# ----------------------------------------------------------------------------------------------
# Selection files: weighted runs chosen by experiments.py select
# ----------------------------------------------------------------------------------------------
SELECTION_FORMAT = "maskface-selection/1"


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def read_selection_json(path: str | Path) -> dict:
    """A selection file (experiments.py select), its structure checked: "runs" (name -> its
    folder), "members" (each a run, or a mask+gender+age trio of runs, with a weight >= 0; the
    weights sum to more than 0) and optional "calibration" "offsets" (18 finite numbers)."""
    value = read_json_checked(path)
    if value.get("format") != SELECTION_FORMAT:
        raise UserError(f"{path}: not a selection file of experiments.py select (expected "
                        f"\"format\": \"{SELECTION_FORMAT}\")")
    runs, members = value.get("runs"), value.get("members")
    if not isinstance(runs, dict) or not all(
            isinstance(r, dict) and isinstance(r.get("path"), str) for r in runs.values()):
        raise UserError(f"{path}: expected \"runs\": an object of run name -> {{\"path\": ...}}")
    if not isinstance(members, list) or not members:
        raise UserError(f"{path}: expected \"members\": a non-empty list")
    for number, member in enumerate(members, 1):
        names = member.get("runs") if isinstance(member, dict) else None
        if (not isinstance(names, list) or len(names) not in (1, 3)
                or not all(isinstance(n, str) and n in runs for n in names)):
            raise UserError(f"{path}: member {number}: expected \"runs\": 1 run (or a trio of "
                            "3) named in \"runs\"")
        if not _finite_number(member.get("weight")) or member["weight"] < 0:
            raise UserError(f"{path}: member {number}: weight {member.get('weight')!r}; "
                            "expected a number >= 0")
    total = sum(member["weight"] for member in members)
    if not total > 0:
        raise UserError(f"{path}: the members' weights sum to {total:g}; expected a positive sum")
    offsets = (value.get("calibration") or {}).get("offsets")
    if offsets is not None and (not isinstance(offsets, list) or len(offsets) != NUM_CLASSES
                                or not all(map(_finite_number, offsets))):
        raise UserError(f"{path}: expected \"calibration\": {{\"offsets\": a list of "
                        f"{NUM_CLASSES} finite numbers}}")
    return value


def selection_offsets(selection: dict) -> np.ndarray | None:
    """The calibration offsets of a checked selection file, None when it has none."""
    offsets = (selection.get("calibration") or {}).get("offsets")
    return None if offsets is None else np.asarray(offsets, dtype=float)
