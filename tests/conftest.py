"""Shared fixtures: a tiny generated dataset in the competition layout (made once per session)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from make_sample import generate_sample  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sample(tmp_path_factory) -> Path:
    """24 train people and 4 eval people: the root holding train/ and eval/."""
    return generate_sample(tmp_path_factory.mktemp("sample") / "data", n_train_people=24,
                           n_eval_people=4, seed=1)


@pytest.fixture()
def tiny_train_dir(tiny_sample) -> Path:
    return tiny_sample / "train" / "images"
