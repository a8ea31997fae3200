"""The checkpoint contract: what every checkpoint of train.py holds (CHECKPOINT_KEYS; last.pth adds
what --resume needs), written atomically, and read with weights_only=True so that a file that
would run code is refused, never executed.
"""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from maskface.cli import UserError
from maskface.files import atomic_write_bytes
from maskface.model import validate_model_name

# every checkpoint holds these; last.pth adds optimizer, scheduler, scaler, train_state and rng
CHECKPOINT_KEYS = ("model_config", "model", "preprocess", "normalize", "category")


def save_checkpoint(state: dict, path: str | Path) -> None:
    """torch.save to a temp file then os.replace: a kill mid-save leaves the old file intact."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


# Checkpoints are read with weights_only=True: tensors and plain Python values only, so a file
# that would run code when unpickled (a crafted "checkpoint") is refused, never executed. Checkpoints
# written before that switch also hold numpy arrays (the RNG state of last.pth): numpy's array
# reconstruction, which runs no user code, is the one addition allowed.
_NUMPY_ARRAY_GLOBALS = [np.ndarray, np.dtype, np.dtypes.UInt32DType, np.dtypes.Float64DType,
                        np.dtypes.Int64DType, np._core.multiarray._reconstruct,
                        np._core.multiarray.scalar]


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """A train.py checkpoint, loaded without running any code it might carry; ``mmap`` only maps
    it (a cheap check that it is whole). UserError naming the file otherwise."""
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as why:
        found = re.search(r"GLOBAL (\S+)", str(why))
        what = f" ({found.group(1)})" if found else ""
        raise UserError(f"{path}: refused: it holds an object{what} that loading would have to "
                        "run code for, which no checkpoint of this toolkit does") from None
    except Exception as why:  # a torn or foreign file: name it instead of a traceback
        raise UserError(f"{path}: not a readable checkpoint ({type(why).__name__}); expected a "
                        "whole file written by train.py") from None


def read_checkpoint(path: str | Path) -> dict:
    """A train.py checkpoint whose keys and architecture name are checked, without building the
    network; UserError naming ``path`` otherwise."""
    checkpoint = load_checkpoint(path)
    missing = [k for k in CHECKPOINT_KEYS
               if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise UserError(f"{path}: not a train.py checkpoint (missing {', '.join(missing)})")
    config = checkpoint["model_config"]
    if not isinstance(config, dict) or not isinstance(config.get("name"), str):
        raise UserError(f"{path}: model_config {config!r}; expected a dict with a model 'name'")
    try:
        validate_model_name(config["name"])
    except ValueError as why:  # the name comes from the file, so the file is what to name
        raise UserError(f"{path}: model_config: {why}") from None
    return checkpoint
