"""Files the toolkit reads and writes: every file written whole or not at all (atomic writes,
files that belong together written together, temp files of killed runs cleaned), paths read from a
CSV kept inside their folder, and the user's CSV and JSON files checked cell by cell before any
work. Standard library, numpy and pandas only.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from maskface.cli import UserError


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


def hold_shared(path: str | Path):
    """An open handle holding a shared flock on ``path`` for as long as it is open: marks a file
    as read by a running job (any number may hold it), so try_lock_exclusive refuses it. Waits
    while an exclusive holder (a prune deciding on it) has it."""
    handle = open(path, "rb")
    fcntl.flock(handle, fcntl.LOCK_SH)
    return handle


def try_lock_exclusive(path: str | Path):
    """An open handle holding an exclusive flock on ``path`` when no one holds any lock on it
    (no running job reads it, nothing writes it); None otherwise, at once, without waiting."""
    handle = open(path, "rb")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
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
    existing = path if folder and path.is_dir() else None
    for parent in path.parents:
        if existing is not None:
            break
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
            existing = parent
    if existing is not None:
        # tried, not asked (os.access): read-only mounts and root's exceptions show only so; found
        # now, before the work whose output could not be written
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as why:
            raise UserError(f"{flag} {path}: {existing} is not writable "
                            f"({why.strerror or why}); expected a folder this user can write") \
                from None
    return path


def check_outputs_apart(outputs: list[Path], inputs: list[Path], folders: list[Path],
                        what: str = "an output") -> None:
    """Outputs never replace an input of the same command, nor land in a folder whose files are
    inputs or records (a run folder, the eval folder): `--name_csv answers.csv` into the eval
    folder would overwrite the truth it is scored against. UserError naming both otherwise."""
    def real(p: Path) -> Path:
        return Path(os.path.realpath(p))
    for output in outputs:
        out = real(output)
        for source in inputs:
            if out == real(source):
                raise UserError(f"{output}: {what} would overwrite the input {source}; "
                                "write it elsewhere (--output_dir, --name_csv)")
        for folder in folders:
            if real(folder) in out.parents:
                raise UserError(f"{output}: {what} inside {folder}, a folder this command reads "
                                "(a run folder or the eval data); write it elsewhere "
                                "(--output_dir)")


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


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def error_reason(why: BaseException) -> str:
    """'Type: first line of the message': a user's exception, fit for a one-line error."""
    text = str(why).strip()
    return type(why).__name__ + (f": {text.splitlines()[0]}" if text else "")


def import_user_module(module_name: str, where: str, prefix: str):
    """(module, its source file resolved or None) of a user's code: a .py path or an importable
    module name. A file gets a module name of its own (``prefix`` + a digest of its path,
    registered in sys.modules, so two runs' files never shadow each other and dataclasses and
    pickling find it). UserError starting with ``where`` when it is missing or does not import."""
    path = Path(module_name)
    try:
        if module_name.endswith(".py") or path.is_file():
            if not path.is_file():
                raise UserError(f"{where}: {module_name}: file not found")
            unique = prefix + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
            spec = importlib.util.spec_from_file_location(unique, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[unique] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except ModuleNotFoundError as why:
        raise UserError(f"{where}: {error_reason(why)} (give a .py path or an importable module, "
                        "then :function)") from None
    except Exception as why:  # the user's code raised while importing
        raise UserError(f"{where}: {module_name} does not import ({error_reason(why)})") from None
    source = getattr(module, "__file__", None)
    return module, (str(Path(source).resolve()) if source else None)
