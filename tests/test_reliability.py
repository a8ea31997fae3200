"""Reliability kept here until face detection settles: face detection keeps what it found when
killed."""
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd

from maskface import face

ROOT = Path(__file__).resolve().parents[1]


def test_face_detection_keeps_what_it_found_when_killed(tiny_train_dir, tmp_path):
    cache = tmp_path / "boxes.csv"
    script = f"""
import os, signal
from maskface import face
face.SAVE_EVERY_S = 0  # save after every photo, as a long run does every {face.SAVE_EVERY_S:.0f} s
real, calls = face.detect_face, []
def detect_then_die(image):
    calls.append(1)
    if len(calls) == 6:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(image)
face.detect_face = detect_then_die
face.main([{str(tiny_train_dir)!r}, "--limit", "2", "--cache", {str(cache)!r}])
"""
    killed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            timeout=120)
    assert killed.returncode == -signal.SIGKILL
    assert len(pd.read_csv(cache)) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["boxes.csv"]
    _, n_detected = face.detect_boxes([str(p) for p in sorted(tiny_train_dir.glob("*/*.jpg"))[:14]],
                                      None, cache, progress=False)
    assert n_detected == 14 - 5
