"""train.py, the script: one-line errors without a traceback, typos and unreadable weights named
before data loads."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

import train
from maskface import (
    config,
)
from maskface.cli import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_model_typo_rejected_before_data_loads(tmp_path):
    args = config.parse_args(["--model", "resnet1888", "--data_dir", str(tmp_path / "nowhere")])
    with pytest.raises(UserError, match="resnet18"):
        train.main(args)
    result = subprocess.run([sys.executable, "train.py", "--model", "efficentnet_b0"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "efficientnet_b0" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_error_is_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--data_dir", str(tmp_path / "none")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:") and "none" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("extra, expected", [
    (["--val_ratio", "0.99"], "leaves no training person"),
    (["--drop_ages", "0-200"], "--drop_ages 0-200 leaves no training photo"),
    (["--kfold", "500"], "--kfold 500: only"),
    (["--kfold", "2", "--fold", "5"], "--fold 5: expected 0..1"),
    (["--kfold", "2", "--drop_ages", "0-200"], "leaves no training photo"),
])
def test_split_problems_found_before_decoding_or_run_folders(tiny_train_dir, tmp_path, extra, expected):
    args = config.parse_args(["--data_dir", str(tiny_train_dir), "--model_dir", str(tmp_path / "runs"),
                             "--cache_dir", str(tmp_path / "cache"), *extra])
    with pytest.raises(UserError, match=re.escape(expected)):
        train.main(args)
    assert not any(tmp_path.iterdir())  # no cache decoded, no run folder made


def test_unreadable_weights_named_before_data_loads(tmp_path):
    weights = tmp_path / "notes.pth"
    weights.write_text("these are not weights")
    args = config.parse_args(["--weights", str(weights), "--data_dir", str(tmp_path / "nowhere")])
    with pytest.raises(UserError, match=f"weights file {re.escape(str(weights))}: unreadable.*"
                                        "expected a state dict"):
        train.main(args)
