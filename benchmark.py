"""Speed of the toolkit next to the competition baseline's pipeline, measured in one run.

    python benchmark.py                                    # BaseModel 224x224 on the bundled sample
    python benchmark.py --resize 128 96                    # the toolkit's default input size
    python benchmark.py --model resnet18 --amp bf16 --output benchmarks/r18.md
    python benchmark.py --side_by_side 2                   # do folds side by side pay here?

Prints one table (measurement | images/s, seconds or MB | ratio):
  1. data path: the baseline's loader (PIL + torchvision Resize/ToTensor/Normalize in a
     DataLoader) against the toolkit's (decode-once cache -> CachedBatches -> BatchAugmentation
     in train mode on the device): with --augmentation (the headline; train.py's default does
     random flip, affine and colour jitter, which the reference does not) and with
     BaseAugmentation, the same work as the reference;
  2. train step: the model's ceiling (a synthetic batch already on the device) against the real
     training loop (engine.train_one_epoch over cached photos, augmentation included);
  3. inference with and without flip TTA (engine.predict_views);
  4. cache build time from a cold cache, its size on disk, and the peak memory of the process;
  5. with --compare_augmentation VALUE ...: the data path and the training loop with other
     --augmentation values in the same run: presets, and per-image pipelines (a saved
     albumentations file, module:function, TrivialAugmentWide, RandAugment) whose batches come
     from --augment_workers worker processes;
  6. with --side_by_side N: N training processes at once on the device (k-fold's folds run as
     `train.py --fold i &`) against one, in images/s trained in all (one window of
     batches x repeats batches each; it pays where the ratio is clearly above 1).
Every rate is the median of --repeats timed windows of --batches batches, after warm-up batches.
On a shared CPU, other busy processes slow torch's threads far more than the reference's
single-threaded workers: compare runs whose load average (printed) stayed low.
The last line holds the two headline figures in a fixed form, for scripts to parse:
    data path ratio: 8.3x; train loop / ceiling: 85%
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision import transforms

import augmentation
import config
import dataset
import engine
import model as models
import pipelines
from checked_io import FlagParser, UserError, atomic_write_text, check_output_path, run_cli
from make_sample import resolve_train_dir

# BaseModel at 224x224 on 2 CPU cores: 6 batches x 3 repeats take under a minute when the machine
# is otherwise idle, and stay under 3 minutes with other jobs saturating both cores
DEFAULT_BATCHES = 6
DEFAULT_REPEATS = 3
SMOKE_BATCHES, SMOKE_REPEATS = 2, 1
SIDE_BY_SIDE_TIMEOUT_S = 600  # a side-by-side process that has not reported by then is stuck
# the baseline's CustomAugmentation crops 320 x 256 (H x W) out of the 512 x 384 portraits
BASELINE_CENTER_CROP = (320, 256)
AMP_NAMES = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}


def get_args_parser() -> argparse.ArgumentParser:
    p = FlagParser(description="Benchmark the toolkit's data path, training loop and inference "
                               "against the competition baseline's loader.")
    add = p.add_argument
    add("--data_dir", default=None,
        help="train images folder ($SM_CHANNEL_TRAIN, else the bundled sample)")
    add("--model", default="BaseModel", help=models.MODEL_HELP)
    add("--resize", type=int, nargs=2, default=[224, 224], metavar=("H", "W"), help="model input size")
    add("--batch_size", type=int, default=64, help="batch size of every measurement")
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add("--amp", default="auto", choices=engine.AMP_MODES, help="mixed precision (auto: bf16 on CUDA)")
    add("--channels_last", default="auto", choices=("auto", "on", "off"),
        help="channels_last memory format (auto: on for CUDA)")
    add("--augmentation", default="CustomAugmentation", choices=list(augmentation.AUGMENTATIONS),
        help="the toolkit's batch augmentation (train.py's default); its crop also decides "
             "whether the reference loader centre-crops first")
    add("--compare_augmentation", nargs="+", default=[], metavar="VALUE",
        help="also time the data path and training loop with these --augmentation values: "
             "presets or user pipelines (aug.json, module:function), e.g. examples/strong_aug.json "
             "TrivialAugmentWide; off when not given")
    add("--augment_workers", type=int, default=None, metavar="N",
        help="worker processes of the per-image pipelines (as train.py; when not given: one per "
             "core but one, 1..8)")
    add("--optimizer", default="adam", choices=engine.OPTIMIZERS, help="optimizer of the train steps")
    add("--compile", action="store_true", help="torch.compile the model (as train.py --compile)")
    add("--side_by_side", type=int, nargs="+", default=[], metavar="N",
        help="also time N training processes at once on the device (folds run side by side) "
             "against one, e.g. --side_by_side 2 4; off when not given")
    add("--batches", type=int, default=None,
        help=f"batches per timed window (default {DEFAULT_BATCHES}; {SMOKE_BATCHES} with --smoke)")
    add("--repeats", type=int, default=None,
        help=f"timed windows per measurement; the median is reported (default {DEFAULT_REPEATS}; "
             f"{SMOKE_REPEATS} with --smoke)")
    add("--workers", type=int, default=multiprocessing.cpu_count() // 2,
        help="reference DataLoader workers (the baseline's cpu_count() // 2)")
    add("--cache_dir", default=None,
        help="where the cold cache is built (a fresh folder inside it, removed at the end; "
             "default: the system's temp folder)")
    add("--output", default=None, metavar="FILE", help="also write the table as markdown here")
    add("--smoke", action="store_true", help="tiny run for the test suite: few batches, one repeat")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = get_args_parser().parse_args(argv)
    if args.batches is None:
        args.batches = SMOKE_BATCHES if args.smoke else DEFAULT_BATCHES
    if args.repeats is None:
        args.repeats = SMOKE_REPEATS if args.smoke else DEFAULT_REPEATS
    return args


def check_args(args: argparse.Namespace) -> None:
    """Reject bad flags before any work (device, data, cache), naming the flag."""
    try:
        models.validate_model_name(args.model)
    except ValueError as why:
        raise UserError(str(why)) from None
    for flag in ("batches", "repeats", "batch_size"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: expected at least 1")
    if any(n < 1 for n in args.side_by_side):
        raise UserError(f"--side_by_side {' '.join(map(str, args.side_by_side))}: expected "
                        "process counts of at least 1")
    if args.workers < 0:
        raise UserError(f"--workers {args.workers}: expected 0 or more")
    if args.augment_workers is not None and args.augment_workers < 0:
        raise UserError(f"--augment_workers {args.augment_workers}: expected 0 or more")
    preprocess = dataset.Preprocess(resize=tuple(args.resize))
    for value in args.compare_augmentation:  # loaded and run on dummy images now, not after minutes
        pipelines.checked_pipeline(value, preprocess)
    if min(args.resize) < 16:
        raise UserError(f"--resize {args.resize}: expected H W of at least 16 pixels")
    # both are only used after minutes of measuring: a path of the wrong kind must fail now
    if args.output:
        check_output_path(args.output, "--output")
    if args.cache_dir:
        check_output_path(args.cache_dir, "--cache_dir", folder=True)


def train_settings(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """train.py's flags for this benchmark, so model, optimizer, loss and amp are built as it would."""
    channels_last = device.type == "cuda" if args.channels_last == "auto" else args.channels_last == "on"
    flags = ["--model", args.model, "--resize", *map(str, args.resize),
             "--batch_size", str(args.batch_size), "--device", str(device), "--amp", args.amp,
             "--augmentation", args.augmentation, "--optimizer", args.optimizer]
    flags += ["--channels_last"] if channels_last else []
    flags += ["--compile"] if args.compile else []
    return config.get_args_parser().parse_args(flags)


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    # CUDA kernels run asynchronously: a timer read without this measures only the launches
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(images: int, seconds: list[float]) -> dict:
    """{'images', 'seconds' (each window), 'images_per_s' (median window)}."""
    return {"images": images, "seconds": seconds,
            "images_per_s": images / max(statistics.median(seconds), 1e-9)}


def machine_info(device: torch.device) -> dict:
    info = {"cpus": os.cpu_count(), "torch": torch.__version__, "device": str(device),
            "threads": torch.get_num_threads(), "load_average": round(os.getloadavg()[0], 1)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ----------------------------------------------------------------------------------------------
# The two data paths
# ----------------------------------------------------------------------------------------------
def reference_transform(resize, mean=augmentation.IMAGENET_MEAN, std=augmentation.IMAGENET_STD,
                        center_crop: bool = False) -> transforms.Compose:
    """The baseline's BaseAugmentation (Resize, ToTensor, Normalize); with center_crop, its
    CustomAugmentation: CenterCrop first and ColorJitter(0.1, 0.1, 0.1, 0.1) after the resize."""
    steps = [transforms.CenterCrop(BASELINE_CENTER_CROP)] if center_crop else []
    steps += [transforms.Resize(tuple(resize), Image.BILINEAR)]
    if center_crop:
        steps += [transforms.ColorJitter(0.1, 0.1, 0.1, 0.1)]
    steps += [transforms.ToTensor(), transforms.Normalize(mean=mean, std=std)]
    return transforms.Compose(steps)


class ReferenceDataset(Dataset):
    """The baseline's dataset: every item opens and decodes its JPEG with PIL, then transforms it."""

    def __init__(self, paths: list[str], labels: np.ndarray, transform: transforms.Compose):
        self.paths, self.labels, self.transform = list(paths), np.asarray(labels), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self.transform(Image.open(self.paths[index])), int(self.labels[index])


def reference_loader(paths: list[str], labels: np.ndarray, *, resize, batch_size: int,
                     workers: int, n_images: int, center_crop: bool = False, shuffle: bool = True,
                     pin_memory: bool = False, mean=augmentation.IMAGENET_MEAN,
                     std=augmentation.IMAGENET_STD, seed: int | None = None) -> DataLoader:
    """The baseline's DataLoader over ``n_images`` draws (whole shuffled epochs, as shuffle=True
    gives, continued into a further epoch when more images than the data are needed). With a
    ``seed`` it shuffles as CachedBatches does after torch.manual_seed(seed)."""
    data = ReferenceDataset(paths, labels, reference_transform(resize, mean, std, center_crop))
    if shuffle:
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        sampler = RandomSampler(data, num_samples=n_images, generator=generator)
    else:
        sampler = np.resize(np.arange(len(data)), n_images).tolist()
    return DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, drop_last=True)


def toolkit_batches(images: np.ndarray, targets: np.ndarray, n_images: int, batch_size: int,
                    device: torch.device | str, shuffle: bool = True) -> dataset.CachedBatches:
    """CachedBatches over ``n_images`` rows of the cache (rows repeat when the data is smaller)."""
    rows = np.resize(np.arange(len(images)), n_images)
    return dataset.CachedBatches(images, np.asarray(targets)[rows], rows, batch_size, device,
                                 shuffle=shuffle)


def measure_cache(paths: list[str], preprocess: dataset.Preprocess, cache_dir: Path) -> dict:
    """Build the cache from cold into ``cache_dir``; returns its time, size and the memmap."""
    started = time.perf_counter()
    images = dataset.build_cache(paths, preprocess, cache_dir, progress=False)
    seconds = time.perf_counter() - started
    size = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file())
    return {"images": len(paths), "seconds": seconds, "mb": size / 1e6,
            "mb_per_1000": size / 1e6 / len(paths) * 1000, "array": images}


def measure_data_path(paths: list[str], labels: np.ndarray, images: np.ndarray, *,
                      settings: argparse.Namespace, preprocess: dataset.Preprocess,
                      device: torch.device, batches: int, repeats: int, workers: int) -> dict:
    """images/s of the reference loader and of the toolkit's cached path, each to a normalized
    float [B, 3, H, W] batch on the device."""
    batch_size = settings.batch_size
    custom = settings.augmentation != "BaseAugmentation"
    # the baseline's two pipelines: plain, and its CustomAugmentation (crop + colour jitter)
    reference = {"BaseAugmentation": time_reference(paths, labels, settings, device, batches,
                                                    repeats, workers, custom=False)}
    if custom:
        reference[settings.augmentation] = time_reference(paths, labels, settings, device, batches,
                                                          repeats, workers, custom=True)
    toolkit = {name: time_toolkit_path(images, labels, name, batch_size=batch_size, device=device,
                                       batches=batches, repeats=repeats) for name in reference}
    ratio = {name: toolkit[name]["images_per_s"] / reference[name]["images_per_s"]
             for name in reference}
    return {"reference": reference[settings.augmentation],
            "reference_base": reference["BaseAugmentation"],
            "toolkit": toolkit[settings.augmentation],
            "toolkit_base": toolkit["BaseAugmentation"], "workers": workers,
            "ratio": ratio[settings.augmentation], "ratio_base": ratio["BaseAugmentation"]}


def time_reference(paths: list[str], labels: np.ndarray, settings: argparse.Namespace,
                   device: torch.device, batches: int, repeats: int, workers: int,
                   custom: bool) -> dict:
    """images/s of the baseline's loader, to a normalized batch on the device."""
    batch_size = settings.batch_size
    # one warm-up batch per worker: the workers start together, so by the time the first batch
    # arrives the others are nearly done, and timing from there would flatter the reference
    warmup = max(workers, 1)
    loader = reference_loader(paths, labels, resize=settings.resize, batch_size=batch_size,
                              workers=workers, n_images=(warmup + batches * repeats) * batch_size,
                              center_crop=custom, pin_memory=device.type == "cuda")
    stream = iter(loader)
    for _ in range(warmup):
        next(stream)[0].to(device, non_blocking=True)
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        for _ in range(batches):
            next(stream)[0].to(device, non_blocking=True)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    next(stream, None)  # exhausted: the workers exit and stop competing for the CPU
    del stream, loader
    return rate(batches * batch_size, seconds)


def time_toolkit_path(images: np.ndarray, labels: np.ndarray, preset: str, *,
                      batch_size: int, device: torch.device, batches: int, repeats: int) -> dict:
    """CachedBatches -> BatchAugmentation (train mode) for ``batches`` batches, ``repeats`` times."""
    augment = augmentation.build_augmentation(preset).to(device).train()
    for uint8_images, _, _ in toolkit_batches(images, labels, batch_size, batch_size, device):
        augment(uint8_images)
    epoch = toolkit_batches(images, labels, batches * batch_size, batch_size, device)
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        for uint8_images, _, _ in epoch:
            augment(uint8_images)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return rate(batches * batch_size, seconds)


def time_augmentation(images: np.ndarray, labels: np.ndarray, value: str, *,
                      settings: argparse.Namespace, device: torch.device, batches: int,
                      repeats: int, workers: int) -> dict:
    """--augmentation ``value``'s data path (to a normalized batch on the device) and training
    loop (train_one_epoch with it), images/s each; a per-image pipeline runs in ``workers``
    processes, started (and warmed up) before the timing."""
    pipeline = pipelines.load_pipeline(value)
    if pipeline is None:
        path = time_toolkit_path(images, labels, value, batch_size=settings.batch_size,
                                 device=device, batches=batches, repeats=repeats)
    else:
        augment = augmentation.build_augmentation(value).to(device).train()
        epoch = pipeline_batches(images, labels, pipeline, batches, settings.batch_size, device,
                                 workers)
        next(iter(epoch))  # starts the workers
        seconds = []
        for _ in range(repeats):
            synchronize(device)
            started = time.perf_counter()
            for uint8_images, _, _ in epoch:
                augment(uint8_images)
            synchronize(device)
            seconds.append(time.perf_counter() - started)
        path = rate(batches * settings.batch_size, seconds)
    torch.manual_seed(settings.seed)
    trainer = build_trainer(argparse.Namespace(**{**vars(settings), "augmentation": value}), device)
    epoch = toolkit_batches(images, labels, batches * settings.batch_size, settings.batch_size,
                            device)
    if pipeline is not None:
        epoch = pipeline_batches(images, labels, pipeline, batches, settings.batch_size, device,
                                 workers)
    train_epoch(trainer, epoch)  # warm-up, and the workers' start
    loop = statistics.median(train_epoch(trainer, epoch)["images_per_s"] for _ in range(repeats))
    how = "batched on the device" if pipeline is None else (
        f"per image in {workers} worker process(es)" if workers else "per image, in process")
    return {"value": value, "how": how, "path": path, "loop": loop}


def pipeline_batches(images: np.ndarray, labels: np.ndarray, pipeline: pipelines.Pipeline,
                     batches: int, batch_size: int, device: torch.device,
                     workers: int) -> pipelines.PipelineBatches:
    rows = np.resize(np.arange(len(images)), batches * batch_size)
    cached = dataset.CachedBatches(images, np.asarray(labels)[rows], rows, batch_size, device,
                                   shuffle=True, preload=False)
    return pipelines.PipelineBatches(cached, pipeline, workers)


def build_trainer(settings: argparse.Namespace, device: torch.device) -> engine.Trainer:
    """Model, loss, optimizer, scaler and augmentation as train.py builds them for ``settings``."""
    n_out = dataset.num_outputs(settings.category, settings.age_label_num)
    return engine.build_trainer(settings, n_out, device, steps_per_epoch=1)


def train_epoch(trainer: engine.Trainer, batches, augment: nn.Module | None = None) -> dict:
    """engine.train_one_epoch over ``batches`` with the trainer's parts (its augmentation unless
    another is given)."""
    return engine.train_one_epoch(trainer, batches, augment=augment, progress=False)


def warmup_batches(device: torch.device) -> int:
    # cuDNN's autotuner (benchmark mode) tries kernels on the first batches of each shape
    return 3 if device.type == "cuda" else 1


def measure_training(settings: argparse.Namespace, images: np.ndarray, targets: np.ndarray, *,
                     device: torch.device, batches: int, repeats: int) -> dict:
    """Train-step images/s: synthetic batches already on the device (the ceiling) against the real
    loop on cached photos, both through engine.train_one_epoch with the same model and optimizer;
    the windows alternate so background load hits both alike. Returns the model for inference."""
    torch.manual_seed(settings.seed)
    trainer = build_trainer(settings, device)
    batch_size, (height, width) = settings.batch_size, settings.resize

    synthetic = torch.randn(batch_size, 3, height, width, device=device)
    if settings.channels_last:
        synthetic = synthetic.contiguous(memory_format=torch.channels_last)
    n_out = dataset.num_outputs(settings.category, settings.age_label_num)
    synthetic_targets = torch.randint(0, n_out, (batch_size,), device=device)
    # an identity "augmentation" over ready batches: the very same step code, minus the data
    ready = [(synthetic, synthetic_targets, None)] * batches
    real = toolkit_batches(images, targets, batches * batch_size, batch_size, device)

    warmup = warmup_batches(device)
    train_epoch(trainer, ready[:warmup], nn.Identity())
    train_epoch(trainer, toolkit_batches(images, targets, warmup * batch_size, batch_size, device))
    ceiling_rates, loop_rates = [], []
    for _ in range(repeats):
        ceiling_rates.append(train_epoch(trainer, ready, nn.Identity())["images_per_s"])
        loop_rates.append(train_epoch(trainer, real)["images_per_s"])
    ceiling = {"images": batches * batch_size, "images_per_s": statistics.median(ceiling_rates),
               "rates": ceiling_rates}
    loop = {"images": batches * batch_size, "images_per_s": statistics.median(loop_rates),
            "rates": loop_rates}
    return {"ceiling": ceiling, "loop": loop,
            "percent": 100 * loop["images_per_s"] / ceiling["images_per_s"],
            "model": trainer.net, "autocast_dtype": trainer.autocast_dtype}


# ----------------------------------------------------------------------------------------------
# Several training processes side by side on one device (folds of a k-fold run, `--fold i &`)
# ----------------------------------------------------------------------------------------------
def side_by_side_worker(settings: argparse.Namespace, cache_path: str, targets: np.ndarray,
                        batches: int, threads: int, seed: int, barrier, reports) -> None:
    """One of N processes training at once on one device, as `train.py --fold i` would: its own
    model and optimizer over the shared cache file. Warms up, waits for the others, trains
    ``batches`` batches, and reports when it started and ended (or what went wrong)."""
    try:
        torch.set_num_threads(threads)
        engine.tune_host_allocator()
        device = torch.device(settings.device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        images = np.load(cache_path, mmap_mode="r")
        torch.manual_seed(seed)
        trainer = build_trainer(settings, device)
        batch_size = settings.batch_size
        train_epoch(trainer, toolkit_batches(images, targets, warmup_batches(device) * batch_size,
                                             batch_size, device))
        epoch = toolkit_batches(images, targets, batches * batch_size, batch_size, device)
        barrier.wait(timeout=SIDE_BY_SIDE_TIMEOUT_S)
        started = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
        images_done = train_epoch(trainer, epoch)["images"]
        reports.put({"images": images_done, "started": started, "ended": time.perf_counter()})
    except BaseException as why:  # the parent turns this into one error line
        barrier.abort()
        reports.put({"error": f"{type(why).__name__}: {why}"})


def measure_side_by_side(settings: argparse.Namespace, cache_path: str | Path,
                         targets: np.ndarray, *, counts: list[int], batches: int) -> list[dict]:
    """Train-loop images/s of N processes training at once on ``settings.device``, for 1 and each
    N in ``counts``: all images trained over the time from the common start to the last finish.
    The CPU threads are shared out (each process gets threads // N), so on a CPU this asks whether
    N small jobs beat one job with all the cores; on a GPU, whether one job leaves it idle."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot start again in a forked child
    threads = torch.get_num_threads()
    rows = []
    for n in sorted({1, *counts}):
        barrier, reports, threads_each = context.Barrier(n), context.Queue(), max(1, threads // n)
        workers = [context.Process(target=side_by_side_worker, daemon=True, args=(
            settings, str(cache_path), targets, batches, threads_each, settings.seed + i,
            barrier, reports)) for i in range(n)]
        for worker in workers:
            worker.start()
        try:
            done = collect_reports(reports, workers)
        finally:
            for worker in workers:
                worker.join(timeout=30)
                if worker.is_alive():
                    worker.kill()
        errors = [r["error"] for r in done if "error" in r]
        if errors:
            raise UserError(f"side-by-side run of {n} process(es) on {settings.device} failed: "
                            f"{errors[0]}")
        seconds = max(r["ended"] for r in done) - min(r["started"] for r in done)
        images = sum(r["images"] for r in done)
        rows.append({"processes": n, "images": images, "seconds": seconds,
                     "threads_each": threads_each,
                     "images_per_s": images / max(seconds, 1e-9)})
    for row in rows:
        row["ratio"] = row["images_per_s"] / rows[0]["images_per_s"]
    return rows


def collect_reports(reports, workers: list) -> list[dict]:
    """One report per worker; a worker that died without one (killed, out of memory) is reported
    as an error instead of waiting for it forever."""
    import queue
    done: list[dict] = []
    deadline = time.monotonic() + SIDE_BY_SIDE_TIMEOUT_S
    while len(done) < len(workers):
        try:
            done.append(reports.get(timeout=1.0))
            continue
        except queue.Empty:
            pass
        dead = [w for w in workers if w.exitcode not in (None, 0)]
        if dead:
            return done + [{"error": f"a process exited with code {dead[0].exitcode}"}]
        if time.monotonic() > deadline:
            return done + [{"error": f"no result after {SIDE_BY_SIDE_TIMEOUT_S} s"}]
    return done


def measure_inference(net: nn.Module, settings: argparse.Namespace, images: np.ndarray, *,
                      device: torch.device, autocast_dtype, batches: int, repeats: int) -> dict:
    """Eval-mode images/s through engine.predict_views, alone and with flip TTA (a second pass
    over the mirrored batches, averaged as inference.py does); windows alternate."""
    augment = augmentation.build_augmentation(settings.augmentation).to(device)
    batch_size = settings.batch_size
    zeros = np.zeros(len(images), dtype=np.int64)

    def predict(view, tta: str) -> np.ndarray:
        return engine.predict_views(net, view, augment, tta=tta, category="multi",
                                    autocast_dtype=autocast_dtype,
                                    channels_last=settings.channels_last)

    predict(toolkit_batches(images, zeros, batch_size, batch_size, device, shuffle=False), "none")
    epoch = toolkit_batches(images, zeros, batches * batch_size, batch_size, device, shuffle=False)
    plain_seconds, flip_seconds = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        predict(epoch, "none")  # ends on a copy to the host, so the device is done
        plain_seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        predict(epoch, "flip")
        flip_seconds.append(time.perf_counter() - started)
    plain = rate(batches * batch_size, plain_seconds)
    flip = rate(batches * batch_size, flip_seconds)
    return {"plain": plain, "flip": flip, "ratio": flip["images_per_s"] / plain["images_per_s"]}


def peak_memory_mb() -> dict:
    # ru_maxrss is in kilobytes on Linux; children = the largest finished loader worker
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"process": own, "largest_worker": workers}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def headline(results: dict) -> str:
    # the reference pipeline is Resize/ToTensor/Normalize: compared with the same work
    return (f"data path ratio: {results['data_path']['ratio_base']:.1f}x; "
            f"train loop / ceiling: {results['train']['percent']:.0f}%")


def format_report(results: dict) -> str:
    """Markdown: a header naming model, size and machine, then the table."""
    c, d, t, i, m = (results[k] for k in ("config", "data_path", "train", "inference", "memory"))
    cache, machine = results["cache"], results["machine"]
    height, width = c["resize"]
    gpu = f", GPU {machine['gpu']}" if "gpu" in machine else ""
    lines = [
        f"## {c['model']} {height}x{width}, batch {c['batch_size']}, {machine['device']} "
        f"(amp {c['amp']}, channels_last {'on' if c['channels_last'] else 'off'}, "
        f"{'compiled, ' if c['compile'] else ''}{c['augmentation']})",
        "",
        f"machine: {machine['cpus']} CPUs, torch {machine['torch']}, device {machine['device']}"
        f"{gpu}, {machine['threads']} torch threads, load average {machine['load_average']} at "
        f"start, {machine['load_average_end']} at end",
        f"data: {c['n_photos']} photos in {c['data_dir']} | timed: {c['batches']} batches x "
        f"{c['repeats']} repeats, median reported | whole benchmark {c['wall_s']:.1f} s",
        "",
        "| measurement | images/s (or seconds/MB) | ratio |",
        "|---|---:|---:|",
        f"| data path: reference, baseline BaseAugmentation (PIL + torchvision, DataLoader "
        f"{d['workers']} workers) | {d['reference_base']['images_per_s']:,.0f} img/s | 1.0x |",
        f"| data path: toolkit, BaseAugmentation (cache -> CachedBatches -> device) "
        f"| {d['toolkit_base']['images_per_s']:,.0f} img/s | {d['ratio_base']:.1f}x |",
    ]
    if c["augmentation"] != "BaseAugmentation":
        lines += [
            f"| data path: reference, baseline CustomAugmentation (+ centre crop, ColorJitter) "
            f"| {d['reference']['images_per_s']:,.0f} img/s | 1.0x |",
            f"| data path: toolkit, {c['augmentation']} (+ flip, affine warp, colour jitter) "
            f"| {d['toolkit']['images_per_s']:,.0f} img/s | {d['ratio']:.1f}x |"]
    lines += [
        f"| train step: ceiling (synthetic batch on {machine['device']}) "
        f"| {t['ceiling']['images_per_s']:,.1f} img/s | 100% |",
        f"| train step: toolkit loop (train_one_epoch, real photos) "
        f"| {t['loop']['images_per_s']:,.1f} img/s | {t['percent']:.0f}% |",
        f"| inference (predict_views) | {i['plain']['images_per_s']:,.0f} img/s | 1.00x |",
        f"| inference with flip TTA | {i['flip']['images_per_s']:,.0f} img/s | {i['ratio']:.2f}x |",
        f"| cache build, cold ({cache['images']:,} photos) | {cache['seconds']:.1f} s "
        f"| {cache['images'] / max(cache['seconds'], 1e-9):,.0f} img/s |",
        f"| cache size on disk | {cache['mb']:,.1f} MB | {cache['mb_per_1000']:,.1f} MB / 1,000 photos |",
        f"| peak memory (ru_maxrss) | {m['process']:,.0f} MB "
        f"| largest loader worker {m['largest_worker']:,.0f} MB |",
    ]
    for row in results.get("augmentations", []):
        lines += [
            f"| data path: toolkit, {row['value']} ({row['how']}) "
            f"| {row['path']['images_per_s']:,.0f} img/s "
            f"| {row['path']['images_per_s'] / d['reference']['images_per_s']:.1f}x |",
            f"| train step: toolkit loop with {row['value']} | {row['loop']:,.1f} img/s "
            f"| {100 * row['loop'] / t['ceiling']['images_per_s']:.0f}% |"]
    for row in results.get("side_by_side", []):
        what = ("1 training process" if row["processes"] == 1
                else f"{row['processes']} training processes at once, in all")
        lines.append(f"| side by side: {what} ({row['threads_each']} CPU threads each) "
                     f"| {row['images_per_s']:,.1f} img/s | {row['ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> dict:
    """Run every measurement as ``args`` says; prints and returns the results."""
    started = time.perf_counter()
    check_args(args)
    device = engine.resolve_device(args.device)
    engine.tune_host_allocator()
    settings = train_settings(args, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as train.py: fixed input sizes
    machine = machine_info(device)
    data_dir = resolve_train_dir(args.data_dir)
    frame = dataset.add_labels(dataset.parse_train_dir(data_dir))
    paths = frame["path"].tolist()
    targets = dataset.training_targets(frame, "multi")
    preprocess = config.preprocess_of(settings)
    batches, repeats = args.batches, args.repeats

    parent = Path(args.cache_dir) if args.cache_dir else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(tempfile.mkdtemp(prefix="benchmark-cache-", dir=parent))
    try:
        cache = measure_cache(paths, preprocess, cache_dir)
        images = cache.pop("array")
        data_path = measure_data_path(paths, targets, images, settings=settings,
                                      preprocess=preprocess, device=device, batches=batches,
                                      repeats=repeats, workers=args.workers)
        training = measure_training(settings, images, targets, device=device, batches=batches,
                                    repeats=repeats)
        net, autocast_dtype = training.pop("model"), training.pop("autocast_dtype")
        inferred = measure_inference(net, settings, images, device=device,
                                     autocast_dtype=autocast_dtype, batches=batches,
                                     repeats=repeats)
        del net
        workers = pipelines.default_workers() if args.augment_workers is None \
            else args.augment_workers
        compared = [time_augmentation(images, targets, value, settings=settings, device=device,
                                      batches=batches, repeats=repeats, workers=workers)
                    for value in args.compare_augmentation]
        memory = peak_memory_mb()  # before the side-by-side processes count as children
        side_by_side = []
        if args.side_by_side:
            if device.type == "cuda":  # hand this process's cached blocks back for the others
                torch.cuda.empty_cache()
            side_by_side = measure_side_by_side(settings, images.filename, targets,
                                                counts=args.side_by_side,
                                                batches=batches * repeats)
        del images
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    results = {
        "config": {"model": args.model, "resize": list(settings.resize),
                   "batch_size": args.batch_size, "amp": AMP_NAMES[autocast_dtype],
                   "channels_last": settings.channels_last, "compile": settings.compile,
                   "augmentation": args.augmentation, "batches": batches, "repeats": repeats,
                   "data_dir": str(data_dir), "n_photos": len(paths),
                   "wall_s": time.perf_counter() - started},
        "machine": {**machine, "load_average_end": round(os.getloadavg()[0], 1)},
        "cache": cache, "data_path": data_path, "train": training, "inference": inferred,
        "memory": memory, "side_by_side": side_by_side, "augmentations": compared,
    }
    report = format_report(results)
    if args.output:
        atomic_write_text(args.output, report)
    results["table"] = report
    results["data_path_ratio"] = data_path["ratio_base"]
    results["train_loop_percent"] = training["percent"]
    results["headline"] = headline(results)
    print(report)
    print(results["headline"], flush=True)
    return results


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
