"""Timing training: the trainer train.py builds (engine.build_trainer), stepped on synthetic
batches already on the device (the model's ceiling) and on cached photos (the real loop), in
fp32 and in the chosen precision with their windows alternating, and N training processes side
by side on one device. benchmark.py reports what these measure.
"""
from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from maskface import dataset, distributed, engine, labels
from maskface.cli import UserError
from maskface.settings import Settings

SIDE_BY_SIDE_TIMEOUT_S = 600  # a side-by-side process that has not reported by then is stuck


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


def toolkit_batches(images: np.ndarray, targets: np.ndarray, n_images: int, batch_size: int,
                    device: torch.device | str, shuffle: bool = True) -> dataset.CachedBatches:
    """CachedBatches over ``n_images`` rows of the cache (rows repeat when the data is smaller)."""
    rows = np.resize(np.arange(len(images)), n_images)
    return dataset.CachedBatches(images, np.asarray(targets)[rows], rows, batch_size, device,
                                 shuffle=shuffle)


def build_trainer(settings: Settings, device: torch.device) -> engine.Trainer:
    """Model, loss, optimizer, scaler and augmentation as train.py builds them for ``settings``."""
    n_out = labels.num_outputs(settings.category, settings.age_label_num)
    return engine.build_trainer(settings, n_out, device, steps_per_epoch=1)


def train_epoch(trainer: engine.Trainer, batches, augment: nn.Module | None = None) -> dict:
    """engine.train_one_epoch over ``batches`` with the trainer's parts (its augmentation unless
    another is given)."""
    return engine.train_one_epoch(trainer, batches, augment=augment, progress=False)


def warmup_batches(device: torch.device) -> int:
    # cuDNN's autotuner (benchmark mode) tries kernels on the first batches of each shape
    return 3 if device.type == "cuda" else 1


def measure_training(settings: Settings | list[Settings], images: np.ndarray,
                     targets: np.ndarray, *, device: torch.device, batches: int,
                     repeats: int) -> dict | list[dict]:
    """Train-step images/s: synthetic batches already on the device (the ceiling) against the real
    loop on cached photos, both through engine.train_one_epoch with the same model and optimizer.
    Given a list of settings (precisions), each gets its own trainer; the windows of all of them
    alternate, so background load hits every one alike. Returns the models for inference."""
    many = isinstance(settings, list)
    every = settings if many else [settings]
    prepared = [_prepare_training(s, images, targets, device=device, batches=batches)
                for s in every]
    rates = [{"ceiling": [], "loop": []} for _ in every]
    for _ in range(repeats):
        for (trainer, ready, real), measured in zip(prepared, rates):
            measured["ceiling"].append(train_epoch(trainer, ready, nn.Identity())["images_per_s"])
            measured["loop"].append(train_epoch(trainer, real)["images_per_s"])
    results = []
    for s, (trainer, _, _), measured in zip(every, prepared, rates):
        ceiling, loop = ({"images": batches * s.batch_size, "rates": measured[key],
                          "images_per_s": statistics.median(measured[key])}
                         for key in ("ceiling", "loop"))
        results.append({"ceiling": ceiling, "loop": loop,
                        "percent": 100 * loop["images_per_s"] / ceiling["images_per_s"],
                        "model": trainer.net, "precision": s.precision})
    return results if many else results[0]


def _prepare_training(settings: Settings, images: np.ndarray, targets: np.ndarray, *,
                      device: torch.device, batches: int) -> tuple:
    """(trainer, ready synthetic batches, real cached batches), warmed up."""
    torch.manual_seed(settings.seed)
    trainer = build_trainer(settings, device)
    batch_size, (height, width) = settings.batch_size, settings.resize
    synthetic = torch.randn(batch_size, 3, height, width, device=device)
    if trainer.channels_last:
        synthetic = synthetic.contiguous(memory_format=torch.channels_last)
    n_out = labels.num_outputs(settings.category, settings.age_label_num)
    synthetic_targets = torch.randint(0, n_out, (batch_size,), device=device)
    # an identity "augmentation" over ready batches: the very same step code, minus the data
    ready = [(synthetic, synthetic_targets, None)] * batches
    real = toolkit_batches(images, targets, batches * batch_size, batch_size, device)
    warmup = warmup_batches(device)
    train_epoch(trainer, ready[:warmup], nn.Identity())
    train_epoch(trainer, toolkit_batches(images, targets, warmup * batch_size, batch_size, device))
    return trainer, ready, real


def measure_precisions(settings: Settings, images: np.ndarray, targets: np.ndarray, *,
                       device: torch.device, batches: int, repeats: int,
                       compile_too: bool = False) -> dict:
    """measure_training in fp32 and in ``settings``' precision (one measurement when they are the
    same), and torch.compile'd in that precision with ``compile_too``, windows alternating.
    Returns {'fp32', 'chosen', 'compiled' (or None)}; 'chosen' keeps its model for inference."""
    fp32 = settings.replace(amp="off", channels_last="off", compile=False)
    chosen = settings.replace(compile=False)
    runs = {"chosen": chosen}
    if chosen.precision != fp32.precision:
        runs["fp32"] = fp32
    if compile_too:
        runs["compiled"] = chosen.replace(compile=True)
    measured = dict(zip(runs, measure_training(list(runs.values()), images, targets,
                                               device=device, batches=batches, repeats=repeats)))
    for name in set(measured) - {"chosen"}:
        measured[name].pop("model")
    return {"chosen": measured["chosen"], "fp32": measured.get("fp32", measured["chosen"]),
            "compiled": measured.get("compiled")}


# ----------------------------------------------------------------------------------------------
# Several training processes side by side on one device (folds of a k-fold run, `--fold i &`)
# ----------------------------------------------------------------------------------------------
def side_by_side_worker(settings: Settings, cache_path: str, targets: np.ndarray,
                        batches: int, threads: int, seed: int, barrier, reports) -> None:
    """One of N processes training at once on one device, as `train.py --fold i` would: its own
    model and optimizer over the shared cache file. Warms up, waits for the others, trains
    ``batches`` batches, and reports when it started and ended (or what went wrong)."""
    try:
        torch.set_num_threads(threads)
        distributed.tune_host_allocator()
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


def measure_side_by_side(settings: Settings, cache_path: str | Path,
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


def collect_reports(reports, workers: list,
                    timeout_s: float | None = SIDE_BY_SIDE_TIMEOUT_S) -> list[dict]:
    """One report per worker; a worker that died without one (killed, out of memory) is reported
    as an error instead of waiting for it forever (nor longer than ``timeout_s``)."""
    import queue
    done: list[dict] = []
    deadline = time.monotonic() + (timeout_s if timeout_s is not None else float("inf"))
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
            return done + [{"error": f"no result after {timeout_s} s"}]
    return done
