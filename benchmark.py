"""Speed of the toolkit next to the competition baseline's pipeline, measured in one run.

    python benchmark.py                                    # BaseModel 224x224 on the bundled sample
    python benchmark.py --resize 128 96                    # the toolkit's default input size
    python benchmark.py --model resnet18 --amp bf16 --output benchmarks/r18.md
    python benchmark.py --side_by_side 2                   # do folds side by side pay here?
    python benchmark.py --model resnet18 --resize 128 96 --compile  # + torch.compile rows
    python benchmark.py --end_to_end --model resnet18 --resize 128 96 --epochs 4 \
        --data_dir DEV/train/images --eval_dir DEV/eval    # whole jobs: toolkit vs usual code

Prints one table (measurement | images/s, seconds or MB | ratio):
  1. data path: the baseline's loader (PIL + torchvision Resize/ToTensor/Normalize in a
     DataLoader) against the toolkit's (decode-once cache -> CachedBatches -> BatchAugmentation
     in train mode on the device): with --augmentation (the headline; train.py's default does
     random flip, affine and colour jitter, which the reference does not) and with
     BaseAugmentation, the same work as the reference;
  2. train step: the model's ceiling (a synthetic batch already on the device) against the real
     training loop (engine.train_one_epoch over cached photos, augmentation included), in fp32
     and in the precision --amp/--channels_last choose (auto: mixed_precision.choose_precision),
     side by side; with --compile also torch.compile'd;
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
--end_to_end instead times two whole jobs back to back, each in its own process and from cold:
train.py (--epochs, cache built from scratch) + inference.py on --eval_dir, against the usual
pipeline (usual_pipeline.run_job: PIL + torchvision per image in a DataLoader, a plain fp32 loop
with validation every epoch, inference through the same loader) on the same split, and prints both
times and their ratio (last line: "end to end: toolkit 1.9x faster than the usual pipeline").
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
from torch import nn

import augmentation
import config
import dataset
import end_to_end
import engine
import image_cache
import mixed_precision
import model as models
import pipelines
import timing
import usual_pipeline
from checked_io import FlagParser, UserError, atomic_write_text, check_output_path, run_cli
from make_sample import resolve_train_dir

# BaseModel at 224x224 on 2 CPU cores: 6 batches x 3 repeats take under a minute when the machine
# is otherwise idle, and stay under 3 minutes with other jobs saturating both cores
DEFAULT_BATCHES = 6
DEFAULT_REPEATS = 3
SMOKE_BATCHES, SMOKE_REPEATS = 2, 1


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
    add("--amp", default="auto", choices=mixed_precision.AMP_MODES,
        help="precision timed next to fp32, as train.py --amp (auto: bf16 on CUDA and on a CPU "
             "with native bf16 for models where it pays)")
    add("--channels_last", default="auto", choices=mixed_precision.CHANNELS_LAST_MODES,
        help="channels_last memory format, as train.py (auto: on on a CPU and where autocast "
             "runs)")
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
    add("--compile", action="store_true",
        help="also time the train step torch.compile'd (as train.py --compile)")
    add("--end_to_end", action="store_true",
        help="time whole jobs instead: train.py --epochs + inference.py against the usual "
             "pipeline, back to back")
    add("--epochs", type=int, default=4, help="--end_to_end: epochs of both jobs")
    add("--eval_dir", default=None,
        help="--end_to_end: eval folder with info.csv and images/ ($SM_CHANNEL_EVAL, else the "
             "bundled sample)")
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
    for flag in ("batches", "repeats", "batch_size", "epochs"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: expected at least 1")
    if any(n < 1 for n in args.side_by_side):
        raise UserError(f"--side_by_side {' '.join(map(str, args.side_by_side))}: expected "
                        "process counts of at least 1")
    if args.workers < 0:
        raise UserError(f"--workers {args.workers}: expected 0 or more")
    if args.augment_workers is not None and args.augment_workers < 0:
        raise UserError(f"--augment_workers {args.augment_workers}: expected 0 or more")
    preprocess = image_cache.Preprocess(resize=tuple(args.resize))
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
    flags = ["--model", args.model, "--resize", *map(str, args.resize),
             "--batch_size", str(args.batch_size), "--device", str(device), "--amp", args.amp,
             "--channels_last", args.channels_last, "--augmentation", args.augmentation,
             "--optimizer", args.optimizer]
    return config.get_args_parser().parse_args(flags)


# ----------------------------------------------------------------------------------------------
# The two data paths
# ----------------------------------------------------------------------------------------------
def measure_cache(paths: list[str], preprocess: image_cache.Preprocess, cache_dir: Path) -> dict:
    """Build the cache from cold into ``cache_dir``; returns its time, size and the memmap."""
    started = time.perf_counter()
    images = image_cache.build_cache(paths, preprocess, cache_dir, progress=False)
    seconds = time.perf_counter() - started
    size = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file())
    return {"images": len(paths), "seconds": seconds, "mb": size / 1e6,
            "mb_per_1000": size / 1e6 / len(paths) * 1000, "array": images}


def measure_data_path(paths: list[str], labels: np.ndarray, images: np.ndarray, *,
                      settings: argparse.Namespace, preprocess: image_cache.Preprocess,
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
    loader = usual_pipeline.reference_loader(
        paths, labels, resize=settings.resize, batch_size=batch_size, workers=workers,
        n_images=(warmup + batches * repeats) * batch_size, center_crop=custom,
        pin_memory=device.type == "cuda")
    stream = iter(loader)
    for _ in range(warmup):
        next(stream)[0].to(device, non_blocking=True)
    seconds = []
    for _ in range(repeats):
        timing.synchronize(device)
        started = time.perf_counter()
        for _ in range(batches):
            next(stream)[0].to(device, non_blocking=True)
        timing.synchronize(device)
        seconds.append(time.perf_counter() - started)
    next(stream, None)  # exhausted: the workers exit and stop competing for the CPU
    del stream, loader
    return timing.rate(batches * batch_size, seconds)


def time_toolkit_path(images: np.ndarray, labels: np.ndarray, preset: str, *,
                      batch_size: int, device: torch.device, batches: int, repeats: int) -> dict:
    """CachedBatches -> BatchAugmentation (train mode) for ``batches`` batches, ``repeats`` times."""
    augment = augmentation.build_augmentation(preset).to(device).train()
    for uint8_images, _, _ in timing.toolkit_batches(images, labels, batch_size, batch_size,
                                                     device):
        augment(uint8_images)
    epoch = timing.toolkit_batches(images, labels, batches * batch_size, batch_size, device)
    return time_augmented_passes(augment, epoch, batches * batch_size, device=device,
                                 repeats=repeats)


def time_augmented_passes(augment: nn.Module, epoch, images: int, *, device: torch.device,
                          repeats: int) -> dict:
    """images/s of ``repeats`` passes over ``epoch``'s batches through ``augment``."""
    seconds = []
    for _ in range(repeats):
        timing.synchronize(device)
        started = time.perf_counter()
        for uint8_images, _, _ in epoch:
            augment(uint8_images)
        timing.synchronize(device)
        seconds.append(time.perf_counter() - started)
    return timing.rate(images, seconds)


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
        path = time_augmented_passes(augment, epoch, batches * settings.batch_size,
                                     device=device, repeats=repeats)
    torch.manual_seed(settings.seed)
    trainer = timing.build_trainer(
        argparse.Namespace(**{**vars(settings), "augmentation": value}), device)
    epoch = timing.toolkit_batches(images, labels, batches * settings.batch_size,
                                   settings.batch_size, device)
    if pipeline is not None:
        epoch = pipeline_batches(images, labels, pipeline, batches, settings.batch_size, device,
                                 workers)
    timing.train_epoch(trainer, epoch)  # warm-up, and the workers' start
    loop = statistics.median(timing.train_epoch(trainer, epoch)["images_per_s"]
                             for _ in range(repeats))
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


def measure_inference(net: nn.Module, settings: argparse.Namespace, images: np.ndarray, *,
                      device: torch.device, precision: mixed_precision.Precision, batches: int,
                      repeats: int) -> dict:
    """Eval-mode images/s through engine.predict_views, alone and with flip TTA (a second pass
    over the mirrored batches, averaged as inference.py does); windows alternate."""
    augment = augmentation.build_augmentation(settings.augmentation).to(device)
    batch_size = settings.batch_size
    zeros = np.zeros(len(images), dtype=np.int64)

    def predict(view, tta: str) -> np.ndarray:
        return engine.predict_views(net, view, augment, tta=tta, category="multi",
                                    autocast_dtype=precision.autocast_dtype,
                                    channels_last=precision.channels_last)

    predict(timing.toolkit_batches(images, zeros, batch_size, batch_size, device, shuffle=False),
            "none")
    epoch = timing.toolkit_batches(images, zeros, batches * batch_size, batch_size, device,
                                   shuffle=False)
    plain_seconds, flip_seconds = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        predict(epoch, "none")  # ends on a copy to the host, so the device is done
        plain_seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        predict(epoch, "flip")
        flip_seconds.append(time.perf_counter() - started)
    plain = timing.rate(batches * batch_size, plain_seconds)
    flip = timing.rate(batches * batch_size, flip_seconds)
    return {"plain": plain, "flip": flip, "ratio": flip["images_per_s"] / plain["images_per_s"]}


def peak_memory_mb() -> dict:
    # ru_maxrss is in kilobytes on Linux; children = the largest finished loader worker
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"process": own, "largest_worker": workers}


# ----------------------------------------------------------------------------------------------
# End to end: whole jobs (end_to_end.py), the toolkit's scripts against the usual pipeline
# ----------------------------------------------------------------------------------------------
def end_to_end_main(args: argparse.Namespace) -> dict:
    """--end_to_end: both whole jobs (end_to_end.measure) in a scratch folder, then the table."""
    machine = timing.machine_info(engine.resolve_device(args.device))
    job = {key: getattr(args, key) for key in (
        "model", "resize", "epochs", "batch_size", "device", "amp", "channels_last",
        "augmentation", "optimizer", "workers", "data_dir", "eval_dir")}
    parent = Path(args.cache_dir) if args.cache_dir else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="benchmark-e2e-", dir=parent))
    try:
        results = end_to_end.measure(job, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine["load_average_end"] = round(os.getloadavg()[0], 1)
    report = end_to_end.format_report(results, job, machine)
    if args.output:
        atomic_write_text(args.output, report)
    results["table"] = report
    results["headline"] = (f"end to end: toolkit {results['ratio']:.2f}x faster than the usual "
                           "pipeline")
    print(report)
    print(results["headline"], flush=True)
    return results


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def headline(results: dict) -> str:
    # the reference pipeline is Resize/ToTensor/Normalize: compared with the same work
    return (f"data path ratio: {results['data_path']['ratio_base']:.1f}x; "
            f"train loop / ceiling: {results['train']['percent']:.0f}%")


def train_rows(results: dict, device: str) -> list[str]:
    """Ceilings in fp32, in the chosen precision and compiled (each against fp32's), then the
    real loop in each (against its own ceiling)."""
    fp32, chosen, compiled = results["train_fp32"], results["train"], results["train_compiled"]
    base = fp32["ceiling"]["images_per_s"]
    name = chosen["precision"].describe(why=False)
    settings = [("fp32", fp32)]
    if chosen is not fp32:
        settings.append((f"chosen = {name}", chosen))
    else:  # the chosen precision is fp32 here: one measurement
        settings[0] = ("fp32 = chosen", fp32)
    if compiled is not None:
        settings.append((f"{name} + torch.compile", compiled))
    rows = [f"| train step: ceiling, {name} (synthetic batch on {device}) "
            f"| {r['ceiling']['images_per_s']:,.1f} img/s "
            f"| {r['ceiling']['images_per_s'] / base:.2f}x fp32 |" for name, r in settings]
    rows += [f"| train step: toolkit loop, {name} (train_one_epoch, real photos) "
             f"| {r['loop']['images_per_s']:,.1f} img/s | {r['percent']:.0f}% of its ceiling |"
             for name, r in settings]
    return rows


def format_report(results: dict) -> str:
    """Markdown: a header naming model, size and machine, then the table."""
    c, d, t, i, m = (results[k] for k in ("config", "data_path", "train", "inference", "memory"))
    cache, machine = results["cache"], results["machine"]
    height, width = c["resize"]
    gpu = f", GPU {machine['gpu']}" if "gpu" in machine else ""
    lines = [
        f"## {c['model']} {height}x{width}, batch {c['batch_size']}, {machine['device']} "
        f"(amp {c['amp']}, channels_last {'on' if c['channels_last'] else 'off'}, "
        f"{c['augmentation']})",
        "",
        f"precision chosen by --amp {c['amp_flag']} --channels_last {c['channels_last_flag']}: "
        f"{t['precision'].describe()}",
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
    lines += train_rows(results, machine["device"]) + [
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
    if args.end_to_end:
        return end_to_end_main(args)
    device = engine.resolve_device(args.device)
    engine.tune_host_allocator()
    settings = train_settings(args, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as train.py: fixed input sizes
    machine = timing.machine_info(device)
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
        measured = timing.measure_precisions(settings, images, targets, device=device,
                                             batches=batches, repeats=repeats,
                                             compile_too=args.compile)
        training, net = measured["chosen"], measured["chosen"].pop("model")
        precision = training["precision"]
        inferred = measure_inference(net, settings, images, device=device, precision=precision,
                                     batches=batches, repeats=repeats)
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
            side_by_side = timing.measure_side_by_side(settings, images.filename, targets,
                                                counts=args.side_by_side,
                                                batches=batches * repeats)
        del images
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    results = {
        "config": {"model": args.model, "resize": list(settings.resize),
                   "batch_size": args.batch_size, "amp": precision.amp,
                   "amp_flag": args.amp, "channels_last_flag": args.channels_last,
                   "channels_last": precision.channels_last, "compile": args.compile,
                   "augmentation": args.augmentation, "batches": batches, "repeats": repeats,
                   "data_dir": str(data_dir), "n_photos": len(paths),
                   "wall_s": time.perf_counter() - started},
        "machine": {**machine, "load_average_end": round(os.getloadavg()[0], 1)},
        "cache": cache, "data_path": data_path, "train": training,
        "train_fp32": measured["fp32"], "train_compiled": measured["compiled"],
        "inference": inferred,
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
