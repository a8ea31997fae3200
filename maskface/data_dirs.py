"""Where the data is: --data_dir, else $SM_CHANNEL_TRAIN / $SM_CHANNEL_EVAL, else the bundled
synthetic sample (generated on first use).
"""
from __future__ import annotations

import os
from pathlib import Path

from maskface.dataset import PROFILE_PATTERN
from maskface.sample import FORMAT_VERSION, generate_sample, read_marker


def ensure_sample(root: str | Path = "sample_data") -> tuple[Path, Path]:
    """(train images dir, eval dir) of the sample at ``root``, generating the default one if missing."""
    root = Path(root)
    marker = read_marker(root)
    if marker is None or marker.get("format") != FORMAT_VERSION:
        generate_sample(root)
    return root / "train" / "images", root / "eval"


SAMPLE_ROOT = Path(__file__).resolve().parents[1] / "sample_data"  # beside the scripts


def resolve_data_dir(given: str | None, split: str, say=print) -> Path:
    """--data_dir, else $SM_CHANNEL_TRAIN / $SM_CHANNEL_EVAL, else the bundled sample's
    train/images or eval/ (generated on first use); ``split`` is 'train' or 'eval'. A train folder
    holding ``images/`` (the competition's train/) stands for its images/."""
    variable = {"train": "SM_CHANNEL_TRAIN", "eval": "SM_CHANNEL_EVAL"}[split]
    given = given or os.environ.get(variable)
    if given:
        return train_images_dir(given) if split == "train" else Path(given)
    folder = dict(zip(("train", "eval"), ensure_sample(SAMPLE_ROOT)))[split]
    say(f"data: no --data_dir or {variable} given; using the bundled sample {folder}")
    return folder


def resolve_train_dir(data_dir: str | None, say=print) -> Path:
    return resolve_data_dir(data_dir, "train", say)


def resolve_eval_dir(eval_dir: str | None, say=print) -> Path:
    return resolve_data_dir(eval_dir, "eval", say)


def train_images_dir(data_dir: str | Path) -> Path:
    """The folder of person folders: ``data_dir`` itself, or its ``images/`` when ``data_dir`` is
    the competition's train/ (holding images/ and train.csv)."""
    path = Path(data_dir)
    if (path / "images").is_dir() and not any(PROFILE_PATTERN.match(p.name) for p in path.iterdir()):
        return path / "images"
    return path
