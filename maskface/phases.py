"""Where a process's time goes: wall and CPU seconds per phase (startup, records, cache, each
epoch's training and validation, checkpoints, inference), so that idle cores show as a low
``cores`` figure (CPU s / wall s) in the phase where they sit idle.

Recording costs two clock reads per phase and is always on; the profile is written only when the
environment variable MASKFACE_PHASES names a folder (benchmark.py --end_to_end sets it for the
scripts it starts): one JSON file per process, written atomically when the process exits.
Standard library only, so any module may record a phase.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from maskface.files import atomic_write_text

ENV = "MASKFACE_PHASES"


def cpu_seconds() -> float:
    """CPU time of this process (every thread) and of its waited-for children (loader workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def process_started() -> float:
    """When this process started (time.time() clock): /proc on Linux, else this module's import,
    so that the imports before the first phase count as its 'startup'."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED


_IMPORTED = time.time()
_records: list[dict] = []
_state = {"end": None}  # when the last phase ended (wall, cpu): the next 'other' starts there


def _add(name: str, wall_start: float, wall: float, cpu: float) -> None:
    _records.append({"phase": name, "start_s": round(wall_start - _STARTED, 3),
                     "wall_s": round(wall, 3), "cpu_s": round(cpu, 3)})


_STARTED = process_started()


@contextlib.contextmanager
def phase(name: str):
    """Time the block as phase ``name``; the time since the previous phase (or since the process
    started: imports, flag parsing, settings) is recorded first as 'startup' or 'other'."""
    wall0, cpu0 = time.time(), cpu_seconds()
    last = _state["end"]
    if last is None:
        _add("startup", _STARTED, wall0 - _STARTED, cpu0)
    elif wall0 - last[0] > 0.05:  # a gap worth naming
        _add("other", last[0], wall0 - last[0], cpu0 - last[1])
    try:
        yield
    finally:
        wall1, cpu1 = time.time(), cpu_seconds()
        _add(name, wall0, wall1 - wall0, cpu1 - cpu0)
        _state["end"] = (wall1, cpu1)


def recorded() -> list[dict]:
    """This process's phases so far, in order: {'phase', 'start_s', 'wall_s', 'cpu_s'}."""
    return list(_records)


def profile() -> dict:
    """This process's phases with its whole life (the time after the last phase is 'exit')."""
    wall, cpu = time.time(), cpu_seconds()
    records = recorded()
    if _state["end"] is not None:
        last_wall, last_cpu = _state["end"]
        records.append({"phase": "exit", "start_s": round(last_wall - _STARTED, 3),
                        "wall_s": round(wall - last_wall, 3), "cpu_s": round(cpu - last_cpu, 3)})
    return {"script": Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python",
            "pid": os.getpid(), "started": _STARTED, "wall_s": round(wall - _STARTED, 3),
            "cpu_s": round(cpu, 3), "cpus": os.cpu_count(), "phases": records}


def _write_at_exit() -> None:
    folder = os.environ.get(ENV)
    if folder and _records:
        atomic_write_text(Path(folder) / f"phases-{os.getpid()}.json", json.dumps(profile()))


atexit.register(_write_at_exit)


def read_profiles(folder: str | Path) -> list[dict]:
    """Every process's profile written into ``folder``, in the order the processes started."""
    found = [json.loads(p.read_text()) for p in Path(folder).glob("phases-*.json")]
    return sorted(found, key=lambda p: p["started"])


def cores(wall_s: float, cpu_s: float) -> float:
    """Busy cores on average: CPU seconds per wall second."""
    return cpu_s / wall_s if wall_s > 0 else 0.0
