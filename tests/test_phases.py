"""maskface.phases: wall and CPU seconds per phase, the gaps between phases, and the profile
written at exit only when MASKFACE_PHASES names a folder."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from maskface import phases

ROOT = Path(__file__).resolve().parents[1]


def busy(seconds: float) -> None:
    import time
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def run_script(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True)


def test_a_phase_counts_the_cpu_it_burns_and_the_time_before_it():
    before = len(phases.recorded())
    with phases.phase("spin"):
        busy(0.2)
    with phases.phase("spin again"):
        pass
    records = phases.recorded()[before:]
    spin = next(r for r in records if r["phase"] == "spin")
    assert spin["cpu_s"] >= 0.15 and spin["wall_s"] >= spin["cpu_s"] * 0.5
    assert records[-1]["phase"] == "spin again"
    if before == 0:  # this process's first phase: the time since it started is its startup
        assert records[0]["phase"] == "startup" and records[0]["wall_s"] > 0


def test_the_profile_is_written_at_exit_only_where_asked(tmp_path):
    code = """
        import time
        from maskface import phases
        with phases.phase("records"):
            pass
        time.sleep(0.2)
        with phases.phase("train"):
            sum(range(10**6))
    """
    quiet = {k: v for k, v in os.environ.items() if k != phases.ENV}
    assert run_script(code, quiet).returncode == 0
    assert not any(tmp_path.iterdir())
    done = run_script(code, {**quiet, phases.ENV: str(tmp_path)})
    assert done.returncode == 0, done.stderr
    written = list(tmp_path.glob("phases-*.json"))
    assert len(written) == 1
    profile = json.loads(written[0].read_text())
    names = [r["phase"] for r in profile["phases"]]
    assert names == ["startup", "records", "other", "train", "exit"]
    other = profile["phases"][2]
    assert other["wall_s"] >= 0.15 and other["cpu_s"] < other["wall_s"]  # the sleep: idle
    assert profile["wall_s"] >= sum(r["wall_s"] for r in profile["phases"]) - 0.05
    assert phases.read_profiles(tmp_path) == [profile]


def test_profiles_are_read_in_the_order_their_processes_started(tmp_path):
    for pid, started in ((2, 20.0), (1, 10.0)):
        (tmp_path / f"phases-{pid}.json").write_text(json.dumps({"pid": pid, "started": started}))
    assert [p["pid"] for p in phases.read_profiles(tmp_path)] == [1, 2]


@pytest.mark.parametrize("wall, cpu, expected", [(2.0, 3.0, 1.5), (0.0, 1.0, 0.0)])
def test_cores_used_is_cpu_per_wall_second(wall, cpu, expected):
    assert phases.cores(wall, cpu) == expected
