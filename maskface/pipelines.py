"""Per-image augmentation: a user's albumentations or torchvision pipeline, or a preset's policy,
applied to each cached uint8 crop on the CPU while the model trains on the previous batch.

    --augmentation aug.json               albumentations, saved with A.save(pipeline, "aug.json")
    --augmentation aug.yaml               the same, saved with data_format="yaml"
    --augmentation my_aug.py:build        build() in a .py file returns the pipeline: an
    --augmentation my_package.aug:build   albumentations Compose/transform or a torchvision v2
                                          transform (any nn.Module on uint8 [C, H, W] tensors)

load_pipeline resolves a value before any photo is decoded: it loads or imports the pipeline and
runs it on dummy images of the cached size, which must come back as uint8 of that size (random
crops come from --crop_margin/--rrc_scale and normalisation from the device, after the pipeline).
PipelineBatches then stands in for the training CachedBatches: the same order, each image its own
draw, in DataLoader worker processes, with every batch's seed drawn from torch's global RNG (which
checkpoints restore): the same seed gives the same batches with any number of workers, and a
--resume continues exactly. Validation, out-of-fold prediction and inference never use it.
"""
from __future__ import annotations

import json
import os
import random
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from maskface import augmentation, dataset, image_cache
from maskface.augmentation import (
    AUGMENTATIONS,
    PIPELINE_SUFFIXES,
    POLICIES,
    augmentation_spec,
    is_pipeline_value,
)
from maskface.cli import UserError
from maskface.files import error_reason, file_sha256, import_user_module

CHECK_DRAWS = 8  # dummy runs before training: a transform that resizes only sometimes shows up
KINDS = ("albumentations", "torchvision", "policy")


def default_workers() -> int:
    """Worker processes for per-image augmentation: one per core but one (the model's), 1..8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, (cores or 2) - 1))


@dataclass
class Pipeline:
    """A per-image augmentation: uint8 [H, W, C] in, the same shape and dtype out."""
    value: str                 # the --augmentation value, with its file made absolute
    kind: str                  # one of KINDS
    source: str | None = None  # the file it comes from (pipeline file or module), hashed
    sha256: str | None = None
    transform: Any = field(default=None, repr=False)

    def record(self) -> dict:
        """What a checkpoint keeps of it (plain values only): the value, the file and its hash,
        and an albumentations pipeline's serialized form."""
        out = {"value": self.value, "kind": self.kind, "source": self.source,
               "sha256": self.sha256}
        if self.kind == "albumentations":
            import albumentations as A
            try:  # the JSON round trip leaves only what torch.load(weights_only=True) reads
                out["serialized"] = json.loads(json.dumps(A.to_dict(self.transform)))
            except (NotImplementedError, TypeError, ValueError):
                pass  # a Lambda of a module:function pipeline: the hashed source records it
        return out

    def seed(self, seed: int) -> None:
        """Seed every random draw of the pipeline. albumentations gives each transform its own
        generator, seeded alike by Compose.set_random_seed (then a flip and a dropout of equal p
        would always fire together): each gets its own seed of one SeedSequence instead."""
        if self.kind == "albumentations":
            _seed_albumentations(self.transform, np.random.SeedSequence(seed))
        else:  # torchvision draws from torch's global RNG
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2 ** 32)

    def apply(self, image: np.ndarray) -> np.ndarray:
        """One random draw on ``image``; UserError naming the pipeline when it fails or changes
        the image's size or dtype."""
        where = f"--augmentation {self.value}"
        shape = "x".join(map(str, image.shape))
        try:
            if self.kind == "albumentations":
                out = self.transform(image=image)["image"]
            else:
                out = self.transform(torch.from_numpy(image).permute(2, 0, 1))
        except Exception as why:  # the user's code: name it and what it was given
            raise UserError(f"{where}: fails on a {shape} uint8 image ({error_reason(why)})") from None
        if isinstance(out, torch.Tensor):
            out = out.detach().cpu()
            out = out.permute(1, 2, 0).numpy() if out.ndim == 3 else out.numpy()
        if not isinstance(out, np.ndarray):
            raise UserError(f"{where}: returns a {type(out).__name__}; expected an image (numpy "
                            "array or tensor)")
        if out.dtype != np.uint8:
            raise UserError(f"{where}: turns uint8 images into {out.dtype}; expected uint8 "
                            "(leave Normalize/ToTensor/ToDtype out: normalisation runs on the "
                            "device)")
        if out.shape != image.shape:
            raise UserError(f"{where}: changes a {shape} image to {'x'.join(map(str, out.shape))}"
                            "; expected the same size (random crops come from --crop_margin and "
                            "--rrc_scale)")
        return out

    def __getstate__(self) -> dict:
        # worker processes started by spawn/forkserver rebuild it from its value: a class defined
        # in a user's .py file does not pickle by reference
        return {**self.__dict__, "transform": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.kind == "policy":
            self.transform = POLICIES[AUGMENTATIONS[self.value].policy]()
        else:
            self.transform = _load(self.value).transform


def _seed_albumentations(node, seq: np.random.SeedSequence) -> None:
    if hasattr(node, "set_random_seed"):
        node.set_random_seed(int(seq.generate_state(1)[0]))
    children = getattr(node, "transforms", None)
    if isinstance(children, (list, tuple)) and children:
        for child, child_seq in zip(children, seq.spawn(len(children))):
            _seed_albumentations(child, child_seq)


# ----------------------------------------------------------------------------------------------
# Resolving an --augmentation value
# ----------------------------------------------------------------------------------------------
def resolved_value(value: str) -> str:
    """The value a run records: a pipeline file (or a module's .py file) made absolute, so a
    replay from another folder finds the same file; preset and module names as given."""
    if not is_pipeline_value(value) or value in AUGMENTATIONS:
        return value
    if value.lower().endswith(PIPELINE_SUFFIXES):
        return str(Path(value).resolve())
    module, _, function = value.rpartition(":")
    if module.endswith(".py") or Path(module).is_file():
        return f"{Path(module).resolve()}:{function}"
    return value


def load_pipeline(value: str) -> Pipeline | None:
    """The per-image part of an --augmentation value (None for presets without one), loaded but
    not yet checked on images; UserError naming the value when it does not load."""
    if value in AUGMENTATIONS:
        policy = AUGMENTATIONS[value].policy
        return None if policy is None else Pipeline(value, "policy", transform=POLICIES[policy]())
    augmentation_spec(value)  # an unknown name: the error listing the choices
    return _load(resolved_value(value))


def _load(value: str) -> Pipeline:
    if value.lower().endswith(PIPELINE_SUFFIXES):
        return _load_file(value)
    module_name, _, function_name = value.rpartition(":")
    module, source = import_user_module(module_name, f"--augmentation {value}",
                                        "maskface_pipeline_")
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(f"--augmentation {value}: {module_name} has no function "
                        f"'{function_name}'")
    try:
        transform = function()
    except Exception as why:
        raise UserError(f"--augmentation {value}: {function_name}() failed ({error_reason(why)})") \
            from None
    kind = _kind(transform)
    if kind is None:
        raise UserError(f"--augmentation {value}: {function_name}() returns a "
                        f"{type(transform).__name__}; expected an albumentations Compose or "
                        "transform, or a torchvision.transforms.v2 transform (an nn.Module)")
    return Pipeline(value, kind, source, source and file_sha256(source), transform)


def _load_file(path: str) -> Pipeline:
    if not Path(path).is_file():
        raise UserError(f"--augmentation {path}: file not found (a pipeline saved with "
                        "albumentations' A.save)")
    try:
        import albumentations as A
    except ImportError:
        raise UserError(f"--augmentation {path}: loading a saved pipeline needs albumentations "
                        "(pip install albumentations)") from None
    data_format = "json" if path.lower().endswith(".json") else "yaml"
    try:
        transform = A.load(path, data_format=data_format)
    except Exception as why:  # JSON/YAML syntax, an unknown transform name, bad arguments
        raise UserError(f"{path}: not an albumentations pipeline A.load can read "
                        f"({error_reason(why)})") from None
    if _kind(transform) != "albumentations":
        raise UserError(f"{path}: holds a {type(transform).__name__}; expected an albumentations "
                        "pipeline (A.save(A.Compose([...]), path))")
    return Pipeline(path, "albumentations", path, file_sha256(path), transform)


def _kind(transform) -> str | None:
    # albumentations only when the user's code brought it in: nothing else needs it installed
    A = sys.modules.get("albumentations")
    if A is not None and isinstance(transform, (A.BasicTransform, A.BaseCompose)):
        return "albumentations"
    if isinstance(transform, nn.Module):
        return "torchvision"
    return None


def check_pipeline(pipeline: Pipeline, shape: tuple[int, int, int]) -> None:
    """Run the pipeline CHECK_DRAWS times on a random uint8 image of ``shape`` (the cache's
    H, W, C); UserError when a draw fails or changes the size or dtype."""
    dummy = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    with kept_rng():
        for seed in range(CHECK_DRAWS):
            pipeline.seed(seed)
            pipeline.apply(dummy.copy())


def checked_pipeline(value: str, preprocess: image_cache.Preprocess,
                     sha256: str | None = None) -> Pipeline | None:
    """load_pipeline, its file checked against ``sha256`` (what a replayed run recorded) and its
    draws checked on dummy images of the cached size: all before any photo is decoded."""
    pipeline = load_pipeline(value)
    if sha256 and (pipeline is None or pipeline.sha256 is None):
        raise UserError(f"--augmentation_sha256 {sha256}: --augmentation {value} has no file "
                        "to check it against")
    if sha256 and pipeline.sha256 != sha256:
        raise UserError(f"--augmentation {pipeline.value}: {pipeline.source} changed since the run "
                        f"recorded it (sha256 {sha256[:12]}... then, {pipeline.sha256[:12]}... "
                        "now); restore it, or pass --augmentation_sha256 "
                        f"{pipeline.sha256} to train a new run with it")
    if pipeline is not None:
        check_pipeline(pipeline, (*preprocess.cached_size, preprocess.channels))
    return pipeline


@contextmanager
def kept_rng():
    """Run per-image draws in this process without moving the training's random state, on one
    torch thread (tiny per-image ops only lose time to thread hand-offs)."""
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


def preview(value: str, images: np.ndarray, seed: int = 0,
            margin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """One training draw of --augmentation ``value`` on cached uint8 images [N, H', W', C]: the
    per-image pipeline (if any), then the device part in train mode, back to uint8 [N, H, W, 3]
    for display (what the notebook shows). Leaves the global random state as it was."""
    pipeline = load_pipeline(value)
    augment = augmentation.build_augmentation(value, margin=margin).train()
    with kept_rng():
        if pipeline is not None:
            images = augment_rows(pipeline, images, range(len(images)), seed)
        torch.manual_seed(seed)
        with torch.no_grad():
            normalised = augment(torch.from_numpy(np.ascontiguousarray(images)))
    shown = (normalised[:, :3] * augment.std[:, :3] + augment.mean[:, :3]).clamp(0, 1)
    return (shown.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Batches: CachedBatches' order, each image through the pipeline in worker processes
# ----------------------------------------------------------------------------------------------
def augment_rows(pipeline: Pipeline, images: np.ndarray, rows, seed: int) -> np.ndarray:
    """uint8 [len(rows), H, W, C]: each cached image ``rows`` through its own draw, the draws
    seeded by ``seed``."""
    pipeline.seed(seed)
    out = np.empty((len(rows), *images.shape[1:]), dtype=np.uint8)
    for i, row in enumerate(rows):
        out[i] = pipeline.apply(np.array(images[row]))  # a writable copy, as transforms expect
    return out


class _AugmentedRows(Dataset):
    """Keys are whole batches (rows, seed, picks); a worker returns (images, picks, error)."""

    def __init__(self, images: np.ndarray, pipeline: Pipeline):
        self.images, self.pipeline = images, pipeline

    def __getstate__(self) -> dict:  # spawn/forkserver: the memmap travels as its file name
        filename = getattr(self.images, "filename", None)
        return {**self.__dict__, "images": filename or self.images}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if isinstance(self.images, (str, os.PathLike)):
            self.images = np.load(self.images, mmap_mode="r")

    def __getitem__(self, key):
        rows, seed, picks = key
        try:
            return torch.from_numpy(augment_rows(self.pipeline, self.images, rows, seed)), picks, ""
        except UserError as why:  # one line in the main process, not a worker's traceback
            return torch.empty(0, dtype=torch.uint8), picks, str(why)


class _Keys:
    """The DataLoader's sampler: this epoch's batch keys, set before each pass (the sampler
    lives in the main process, so persistent workers see each epoch's keys)."""

    def __init__(self) -> None:
        self.keys: list = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


# forked where fork is safe (Linux): workers start at once and need no main-module guard;
# elsewhere the platform's default (spawn), which rebuilds the pipeline from its value
_START_METHOD = "fork" if sys.platform.startswith("linux") else None


@contextmanager
def _forkable_opencv():
    """OpenCV without its thread pool while workers fork: a child that inherits the pool (made by
    the cache build or the CPU warp) deadlocks at its first parallel call. The workers then run
    OpenCV on one thread (one worker is one core) and this process gets its pool back after."""
    import cv2
    threads = cv2.getNumThreads()
    cv2.setNumThreads(0)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)


class PipelineBatches:
    """CachedBatches' batches with every image through ``pipeline`` first: (uint8 [B,H,W,C] on
    the device, targets, rows). ``workers`` processes (0: in this process) prepare the next batches
    while the model trains; each batch's seed comes from torch's global RNG, so the batches do not
    depend on the number of workers."""

    def __init__(self, batches: dataset.CachedBatches, pipeline: Pipeline, workers: int):
        self.batches, self.pipeline, self.workers = batches, pipeline, workers
        self.sampler = batches.sampler  # run_epoch sets DistributedSampler epochs through it
        self.device, self.targets = batches.device, batches.targets
        self.source = _AugmentedRows(batches.images, pipeline)
        self._keys = _Keys()
        self._loader = None

    def __len__(self) -> int:
        return len(self.batches)

    def _batches(self):
        if not self.workers:
            for key in self._keys:
                with kept_rng():  # per batch: the model step in between keeps its own state
                    batch = self.source[key]
                yield batch
            return
        if self._loader is None:
            self._loader = DataLoader(
                self.source, batch_size=None, sampler=self._keys, num_workers=self.workers,
                pin_memory=self.device.type == "cuda", persistent_workers=True,
                prefetch_factor=2, multiprocessing_context=_START_METHOD,
                generator=torch.Generator())  # leaves the global RNG to the batch seeds
            with _forkable_opencv():  # the workers start at the first pass, and stay
                batches = iter(self._loader)
        else:
            batches = iter(self._loader)
        try:
            yield from batches
        except RuntimeError as why:
            if "DataLoader worker" not in str(why):
                raise
            self._loader = None  # its workers are gone; a later pass starts new ones
            # killed by the OOM killer or an os._exit in the pipeline: one line, not torch's trace
            raise UserError(f"--augmentation {self.pipeline.value}: an augmentation worker "
                            f"process died ({str(why).splitlines()[0].strip()}); out of memory? "
                            "try fewer --augment_workers, or 0 to run the pipeline in the "
                            "training process") from None

    def __iter__(self):
        picks = self.batches.batch_picks()
        seeds = torch.randint(0, 2 ** 62, (len(picks),)).tolist()
        self._keys.keys = [(self.batches.rows[p.numpy()], seed, p)
                           for p, seed in zip(picks, seeds)]
        for images, picked, error in self._batches():
            if error:
                raise UserError(error)
            on_device = picked.to(self.device)
            yield (images.to(self.device, non_blocking=True), self.batches.targets[on_device],
                   self.batches.rows[picked.numpy()])
