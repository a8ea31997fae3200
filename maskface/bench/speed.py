"""The speed table of benchmark.py: the toolkit's data path against the competition baseline's
loader, the training loop against the model's ceiling (fp32 and the chosen precision), inference
with and without flip TTA, the cold cache build and peak memory, other augmentations, processes
side by side, or (--end_to_end) two whole jobs back to back. benchmark.py's docstring says how
each row is measured; run(args) takes its flags.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from maskface import (
    augmentation,
    config,
    dataset,
    distributed,
    image_cache,
    mixed_precision,
    model as models,
    pipelines,
    predict,
)
from maskface.bench import end_to_end, timing, timm_peer, usual_pipeline
from maskface.cli import UserError
from maskface.data_dirs import resolve_train_dir
from maskface.files import atomic_write_text, check_output_path
from maskface.settings import Settings, resolve_settings


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
    if getattr(args, "peer_timm", None) is not None:
        if not args.end_to_end:
            raise UserError(f"--peer_timm {args.peer_timm}: only with --end_to_end (it times "
                            "whole jobs)")
        timm_peer.check_peer_script(args.peer_timm)
        import timm
        if not timm.is_model(args.model):
            raise UserError(f"--model {args.model}: --peer_timm needs a model timm's train.py "
                            "knows (e.g. resnet18)")
    if getattr(args, "peer_workers", 0) < 0:
        raise UserError(f"--peer_workers {args.peer_workers}: expected 0 or more")
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


def train_settings(args: argparse.Namespace, device: torch.device) -> Settings:
    """train.py's settings for this benchmark's flags, resolved as train.py resolves them, so
    model, optimizer, loss and precision are built as it would."""
    flags = ["--model", args.model, "--resize", *map(str, args.resize),
             "--batch_size", str(args.batch_size), "--device", str(device), "--amp", args.amp,
             "--channels_last", args.channels_last, "--augmentation", args.augmentation,
             "--optimizer", args.optimizer]
    return resolve_settings(config.parse_args(flags), say=lambda _: None)


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
                      settings: Settings, preprocess: image_cache.Preprocess,
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


def time_reference(paths: list[str], labels: np.ndarray, settings: Settings,
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
                      settings: Settings, device: torch.device, batches: int,
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
    trainer = timing.build_trainer(settings.replace(augmentation=value), device)
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


def measure_inference(net: nn.Module, settings: Settings, images: np.ndarray, *,
                      device: torch.device, precision: mixed_precision.Precision, batches: int,
                      repeats: int) -> dict:
    """Eval-mode images/s through predict.model_probabilities (what inference.py and out-of-fold
    scoring call), alone and with flip TTA (a second pass over the mirrored batches, averaged as
    inference.py does); windows alternate."""
    model = predict.LoadedModel(
        path=None, net=net, name=settings.model, category="multi", age_label_num=3,
        preprocess=settings.preprocess, augmentation=settings.augmentation,
        normalize={"mean": list(augmentation.IMAGENET_MEAN), "std": list(augmentation.IMAGENET_STD)},
        face={}, precision=precision)
    batch_size = settings.batch_size

    def probabilities(n_images: int, tta: str) -> np.ndarray:
        rows = np.resize(np.arange(len(images)), n_images)
        return predict.model_probabilities(model, images, rows, device=device,
                                           batch_size=batch_size, tta=tta)

    probabilities(batch_size, "none")
    plain_seconds, flip_seconds = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        probabilities(batches * batch_size, "none")  # ends on a copy to the host: device done
        plain_seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        probabilities(batches * batch_size, "flip")
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
    machine = timing.machine_info(distributed.resolve_device(args.device))
    job = {key: getattr(args, key) for key in (
        "model", "resize", "epochs", "batch_size", "device", "amp", "channels_last",
        "augmentation", "optimizer", "workers", "data_dir", "eval_dir")}
    job["peer_timm"], job["peer_workers"] = args.peer_timm, args.peer_workers
    parent = Path(args.cache_dir) if args.cache_dir else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="benchmark-e2e-", dir=parent))
    try:
        results = end_to_end.measure(job, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine["load_average_end"] = round(os.getloadavg()[0], 1)
    peer = "peer" in results
    report = (end_to_end.format_peer_report if peer else end_to_end.format_report)(
        results, job, machine)
    if args.output:
        atomic_write_text(args.output, report)
    results["table"] = report
    results["headline"] = (f"end to end: toolkit {results['ratio']:.2f}x faster than "
                           f"{'timm train.py' if peer else 'the usual pipeline'}")
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


def run(args: argparse.Namespace) -> dict:
    """Run every measurement as ``args`` says; prints and returns the results."""
    started = time.perf_counter()
    check_args(args)
    if args.end_to_end:
        return end_to_end_main(args)
    device = distributed.resolve_device(args.device)
    distributed.tune_host_allocator()
    settings = train_settings(args, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as train.py: fixed input sizes
    machine = timing.machine_info(device)
    data_dir = resolve_train_dir(args.data_dir)
    frame = dataset.add_labels(dataset.parse_train_dir(data_dir))
    paths = frame["path"].tolist()
    targets = dataset.training_targets(frame, "multi")
    preprocess = settings.preprocess
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
