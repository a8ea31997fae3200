"""A training run: one model on a train/val split, or one per fold with out-of-fold predictions.

train.py calls train(args). The run resolves its settings once (settings.py), reads the photos and
decides who trains and who validates where (a split, or folds), builds the decode-once image cache,
then fits each model with engine.py's trainer, epoch by epoch, writing the run folder's files
(run_folder.py names them): checkpoints, summary.csv, per-class scores, TensorBoard events.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from maskface import (
    augmentation,
    config,
    dataset,
    distributed,
    engine,
    image_cache,
    labels,
    mixed_precision,
    phases,
    pipelines,
    predict,
    reporting,
    run_folder,
)
from maskface.checkpoint import load_checkpoint, save_checkpoint
from maskface.cli import UserError
from maskface.data_dirs import resolve_train_dir
from maskface.distributed import Processes
from maskface.files import atomic_write_text
from maskface.progress import ModelWork, Reporter
from maskface.settings import Settings, model_normalization, resolve_settings


class EarlyStopping:
    """Stop when val F1 has not improved for ``patience`` epochs; 0 (or -1) turns it off."""

    def __init__(self, patience: int) -> None:
        self.patience = max(patience, 0)
        self.best_f1, self.best_epoch, self.stale_epochs = -1.0, 0, 0

    def step(self, f1: float, epoch: int, always_improves: bool = False) -> bool:
        """Record epoch ``epoch`` (1-based); True when it is the best so far."""
        if always_improves or f1 > self.best_f1:  # without validation every epoch is the best
            self.best_f1, self.best_epoch, self.stale_epochs = f1, epoch, 0
            return True
        self.stale_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.stale_epochs >= self.patience

    def message(self, epoch: int) -> str:
        return (f"EarlyStopping: no better val F1 for {self.patience} epochs; stopping at epoch "
                f"{epoch} (set --early_stopping_patience 0 to turn it off)")

    def state_dict(self) -> dict:
        return {"best_f1": self.best_f1, "best_epoch": self.best_epoch,
                "stale_epochs": self.stale_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best_f1, self.best_epoch = state["best_f1"], state["best_epoch"]
        self.stale_epochs = state["stale_epochs"]


# ----------------------------------------------------------------------------------------------
# Data for a run: records, splits, the cache, batches
# ----------------------------------------------------------------------------------------------
def load_records(settings: Settings, say=print) -> tuple[Path, pd.DataFrame]:
    data_dir = resolve_train_dir(settings.data_dir, say=say)
    frame = dataset.parse_train_dir(data_dir, relabel=settings.relabel, warn=say)
    return data_dir, dataset.add_labels(frame, old_age=settings.old_age)


def build_image_cache(settings: Settings, frame: pd.DataFrame,
                      say=print) -> tuple[np.ndarray, dict]:
    """The decode-once cache for every training photo (and the face boxes when cropping faces)."""
    preprocess, boxes, face_info = settings.preprocess, None, {}
    if preprocess.crop == "face":
        from maskface import face
        boxes, face_info = face.crop_boxes_for_training(frame, preprocess, settings.cache_dir,
                                                        say=say)
    images = image_cache.build_cache(frame["path"].tolist(), preprocess, settings.cache_dir,
                                     boxes=boxes, threads=settings.num_workers or None)
    return images, face_info


def train_rows_after_policies(args, frame: pd.DataFrame,
                              train_rows: np.ndarray) -> np.ndarray:
    """Drop borderline ages (train only), then oversample people (train only)."""
    dropped = config.drop_range(args.drop_ages)
    if dropped:
        ages = frame["age"].to_numpy()[train_rows]
        train_rows = train_rows[(ages < dropped[0]) | (ages > dropped[1])]
        if not len(train_rows):
            raise UserError(f"--drop_ages {args.drop_ages} leaves no training photo")
    return dataset.balance_people(frame, train_rows, args.data_balancing, args.seed)


def normalization(settings: Settings, images: np.ndarray,
                  train_rows: np.ndarray) -> tuple[list, list]:
    """The mean/std a model is fed with: --mean and --std where given, else --normalize as
    resolved (dataset: its training photos')."""
    given_mean, given_std = settings.flags.get("mean"), settings.flags.get("std")
    if given_mean and given_std:  # the dataset's statistics need not be computed at all
        return list(given_mean), list(given_std)
    mean, std = _normalize_mode(settings, images, train_rows)
    return list(given_mean or mean), list(given_std or std)


def _normalize_mode(settings: Settings, images: np.ndarray,
                    train_rows: np.ndarray) -> tuple[list, list]:
    if settings.normalize == "model":
        return model_normalization(settings.model)
    if settings.normalize == "imagenet":
        return list(augmentation.IMAGENET_MEAN), list(augmentation.IMAGENET_STD)
    return augmentation.dataset_statistics(images[np.sort(np.unique(train_rows))],
                                           seed=settings.seed)


def check_class_weights(settings: Settings, frame: pd.DataFrame,
                        train_row_sets: list[np.ndarray]) -> None:
    """--class_weights needs every class among the training photos of each model (each fold):
    checked before any photo is decoded."""
    if settings.class_weights == "none":
        return
    targets = dataset.training_targets(frame, "multi" if settings.multi_head else settings.category,
                                       settings.age_label_num, settings.old_age)
    for k, rows in enumerate(train_row_sets):
        try:
            engine.class_weights_of(settings, targets[rows])
        except UserError as why:
            raise UserError(f"fold {k}: {why}" if len(train_row_sets) > 1 else str(why)) from None


def training_batches(settings: Settings, frame: pd.DataFrame, images: np.ndarray,
                     train_rows: np.ndarray, val_rows: np.ndarray, n_out: int,
                     device: torch.device, procs: Processes):
    """(train batches, this process's val batches, their positions among val_rows); with a
    per-image pipeline the train batches go through it on the CPU first."""
    pipeline = settings.pipeline
    targets = dataset.training_targets(frame, "multi" if settings.multi_head else settings.category,
                                       settings.age_label_num, settings.old_age)
    weights = sampler = None
    if settings.weightsampler:
        if procs.distributed:
            raise UserError("--weightsampler is not supported with several processes; "
                            "use --data_balancing instead")
        counts = np.bincount(targets[train_rows], minlength=n_out).astype(float)
        weights = 1.0 / counts[targets[train_rows]]
    if procs.distributed:
        from torch.utils.data import DistributedSampler
        sampler = DistributedSampler(range(len(train_rows)), num_replicas=procs.world,
                                     rank=procs.rank, shuffle=True, seed=settings.seed)
    train_batches = dataset.CachedBatches(images, targets[train_rows], train_rows,
                                          settings.batch_size, device, shuffle=True,
                                          weights=weights, sampler=sampler,
                                          preload=False if pipeline is not None else None)
    if pipeline is not None:
        workers = settings.augment_workers
        train_batches = pipelines.PipelineBatches(
            train_batches, pipeline, pipelines.default_workers() if workers is None else workers)
    # each process scores its share of val; the shares are gathered back in order
    mine = np.arange(procs.rank, len(val_rows), procs.world)
    val_batches = dataset.CachedBatches(images, targets[val_rows][mine], val_rows[mine],
                                        settings.valid_batch_size, device)
    return train_batches, val_batches, mine


# ----------------------------------------------------------------------------------------------
# One model: train on train_rows, select on val_rows, write the run folder
# ----------------------------------------------------------------------------------------------
# train's optional observer (tune.py's pruner): called with {"event": "epoch", ...} after each
# epoch's checkpoint and {"event": "fold", ...} after each finished fold, on every process; what
# it raises (a pruned trial) stops the run there, its checkpoints kept
Progress = Callable[[dict], None] | None


@dataclass
class FitData:
    """What one model trains and validates on: the photos, their cache and the two row sets."""
    frame: pd.DataFrame
    images: np.ndarray
    train_rows: np.ndarray
    val_rows: np.ndarray
    mean: list
    std: list


def fit(settings: Settings, data: FitData, run_dir: Path, *, extra: dict | None = None,
        procs: Processes = Processes(), hparams: bool = True, progress: Progress = None,
        reporter: Reporter | None = None) -> dict:
    """Train one model; rank 0 writes best.pth, last.pth, summary.csv and TensorBoard events
    (with the run's HParams session at the end unless ``hparams`` is off: a k-fold run logs one
    for the whole run instead). ``reporter`` shows the steps as they train."""
    if reporter is None:
        reporter = Reporter("off", epochs=settings.epochs)
    preprocess = settings.preprocess
    trainer, train_batches, val_batches, mine = seeded_trainer(settings, data, procs)
    stopper = EarlyStopping(settings.early_stopping_patience)
    state = {"epoch": 0, "summary": [], "wall_s": 0.0}
    if (run_dir / run_folder.LAST).is_file():
        state = restore_progress(trainer, stopper, run_dir, procs)
        procs.say(f"resume: {run_dir} from epoch {state['epoch']} (best F1 {stopper.best_f1:.4f})")
    record = checkpoint_record(settings, trainer, data, extra or {})
    reporter.start_model((extra or {}).get("fold"), state["epoch"])
    true_val = data.frame["label"].to_numpy()[data.val_rows]
    val_paths = data_paths(settings, data.frame, data.val_rows)  # named in mistakes.csv
    writer = None
    if procs.main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(run_dir))
    try:
        since = time.perf_counter()
        for epoch in range(state["epoch"], settings.epochs):
            train, val, val_ema = run_epoch(settings, trainer, train_batches, val_batches,
                                            true_val, mine, epoch, writer, procs, reporter)
            row = summary_row(epoch, train, val, lr=trainer.optimizer.param_groups[0]["lr"],
                              val_ema=val_ema)
            step_schedule(settings, trainer, val, warming=epoch < settings.warmup_epochs)
            state["summary"].append(row)
            state["epoch"] = epoch + 1
            # wall-clock training time, kept in last.pth so that a resumed run adds to it
            state["wall_s"] += time.perf_counter() - since
            since = time.perf_counter()
            # the epoch's candidate for best.pth: the model's weights or, when better, the EMA's
            weights_of, kept = ("ema", val_ema) if val_ema and val_ema["f1"] > val["f1"] \
                else ("model", val)
            improved = stopper.step(kept["f1"], epoch + 1, always_improves=not len(data.val_rows))
            rng = procs.gather(distributed.rng_state())  # every process's: a resume is exact on each
            if procs.main:
                with phases.phase("report"):  # TensorBoard figures, the confusion PNG
                    reporting.log_epoch(writer, row, kept, data.images, data.val_rows,
                                        settings.category,
                                        which=" (EMA)" if weights_of == "ema" else "",
                                        confusion_png=run_dir / run_folder.CONFUSION
                                        if improved else None,
                                        margin=preprocess.margin_pixels, paths=val_paths)
                with phases.phase("save"):
                    save_epoch(run_dir, record, trainer, stopper, state, kept, improved, rng,
                               weights_of)
                print(epoch_line(settings, row, improved, kept), flush=True)
            reporter.end_epoch()
            procs.barrier()
            if progress is not None:  # after the checkpoint: a run stopped here can be resumed
                progress({"event": "epoch", "run_dir": run_dir, "fold": (extra or {}).get("fold"),
                          "epoch": epoch + 1, "val_f1": kept["f1"], "best_f1": stopper.best_f1})
            if stopper.should_stop:
                procs.say(stopper.message(epoch + 1))
                break
        reporter.end_model()
        if writer is not None and hparams:
            reporting.log_hparams(writer, settings.flags, reporting.run_hparams_metrics(
                state["summary"], stopper.best_f1, stopper.best_epoch, state["wall_s"]))
    finally:
        if writer is not None:
            writer.close()
    procs.say(f"best: epoch {stopper.best_epoch}, val F1 {stopper.best_f1:.4f} -> "
              f"{run_dir / run_folder.BEST}")
    return {"best_f1": stopper.best_f1, "best_epoch": stopper.best_epoch,
            "summary": state["summary"], "wall_s": state["wall_s"]}


def seeded_trainer(settings: Settings, data: FitData, procs: Processes) -> tuple:
    """The seeded model, optimizer and batches of one fit: (trainer, train batches, validation
    batches, this process's validation positions)."""
    device = distributed.process_device(settings.device, procs)
    distributed.seed_everything(settings.seed)
    n_out = labels.num_outputs(settings.category, settings.age_label_num)
    preprocess = settings.preprocess
    train_batches, val_batches, mine = training_batches(
        settings, data.frame, data.images, data.train_rows, data.val_rows, n_out, device, procs)
    class_weights = engine.class_weights_of(settings, train_batches.targets.cpu().numpy())
    trainer = engine.build_trainer(settings, n_out, device, steps_per_epoch=len(train_batches),
                                   mean=data.mean, std=data.std,
                                   channels=preprocess.channels, procs=procs,
                                   class_weights=class_weights,
                                   margin=preprocess.margin_pixels)
    if procs.distributed:  # different augmentation draws per process, same model init
        torch.manual_seed(settings.seed * 1000 + procs.rank)
    return trainer, train_batches, val_batches, mine


def data_paths(settings: Settings, frame: pd.DataFrame, rows: np.ndarray) -> list[str]:
    """The photos of ``rows`` by their path inside the data folder (as photos.csv names them)."""
    return [os.path.relpath(p, settings.data_dir) for p in frame["path"].to_numpy()[rows]]


def checkpoint_record(settings: Settings, trainer: engine.Trainer, data: FitData,
                      extra: dict) -> dict:
    """What every checkpoint of the model holds besides its weights: all inference needs to
    rebuild and feed it, the run's settings and which run it belongs to."""
    precision = mixed_precision.Precision(trainer.autocast_dtype, trainer.channels_last)
    pipeline = settings.pipeline
    return {"model_config": trainer.net.model_config, "preprocess": settings.preprocess.to_dict(),
            "normalize": {"mean": list(data.mean), "std": list(data.std)},
            "precision": precision.record(),
            "category": settings.category, "age_label_num": settings.age_label_num,
            "augmentation": settings.augmentation, "config": settings.flags,
            # which run this checkpoint belongs to: a last.pth copied from another is refused
            run_folder.RUN_ID: getattr(settings, run_folder.RUN_ID, None),
            "augmentation_pipeline": pipeline.record() if pipeline is not None else None,
            **extra}


def restore_progress(trainer: engine.Trainer, stopper: EarlyStopping, run_dir: Path,
                     procs: Processes) -> dict:
    """--resume: everything that shapes the next epochs, from last.pth (each process its own
    random state); returns the run state (epochs done, summary rows), summary.csv rewritten
    from it. The data and the number of processes were checked against every last.pth of the
    run by check_resumable, before the run folder was touched."""
    saved = load_checkpoint(run_dir / run_folder.LAST)
    states = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]  # per process
    trainer.net.load_state_dict(saved["model"])
    trainer.load_state_dict(saved)
    stopper.load_state_dict(saved["train_state"])
    distributed.set_rng_state(states[procs.rank])
    train_state = saved["train_state"]
    state = {"epoch": train_state["epoch"], "summary": train_state["summary"],
             "wall_s": float(train_state.get("wall_s", 0.0))}  # 0: saved before it was kept
    if procs.main:  # a kill between last.pth and summary.csv left the file an epoch behind
        run_folder.write_summary(run_dir / run_folder.SUMMARY, state["summary"])
    return state


def run_epoch(settings: Settings, trainer: engine.Trainer, train_batches, val_batches,
              true_val: np.ndarray, mine: np.ndarray, epoch: int, writer,
              procs: Processes, reporter: Reporter | None = None) -> tuple[dict, dict, dict | None]:
    """Train one epoch (warming the lr up per batch during the first --warmup_epochs, unless a
    timm schedule warms up itself), then score validation; returns (train metrics gathered over
    processes, val metrics, the EMA weights' val metrics or None). ``reporter`` shows the steps
    and a long validation."""
    if train_batches.sampler is not None:
        train_batches.sampler.set_epoch(epoch)
    steps = len(train_batches)
    warmup = (epoch * steps, settings.warmup_epochs * steps) \
        if epoch < settings.warmup_epochs and not engine.is_timm_schedule(trainer.scheduler) \
        else None
    on_step = reporter.epoch(epoch, steps) if reporter is not None else None
    with phases.phase("train"):
        train = engine.train_one_epoch(trainer, train_batches, warmup=warmup, epoch=epoch,
                                       log_interval=settings.log_interval, writer=writer,
                                       progress=False, on_step=on_step)
    train = gather_train_metrics(train, procs)
    if not len(true_val):
        return train, {"loss": float("nan"), "f1": float("nan"), "acc": float("nan")}, None
    scored = [trainer.runner] + ([trainer.ema.module] if trainer.ema is not None else [])
    if reporter is not None:
        val_batches = reporter.validating(val_batches)
    with phases.phase("validate"):
        vals = [predict.evaluate(model, val_batches, trainer.augment, true_val,
                                 category=settings.category, age_label_num=settings.age_label_num,
                                 criterion=trainer.criterion,
                                 autocast_dtype=trainer.autocast_dtype,
                                 channels_last=trainer.channels_last, procs=procs, positions=mine)
                for model in scored]
    return train, vals[0], vals[1] if len(vals) > 1 else None


def step_schedule(settings: Settings, trainer: engine.Trainer, val: dict,
                  warming: bool) -> None:
    """Epoch schedules step after each epoch (plateau on val loss or F1); per-batch ones stepped
    in the loop, and warm-up epochs leave the schedule alone."""
    if trainer.per_batch_schedule or warming:  # timm's schedules step per update too
        return
    if isinstance(trainer.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        trainer.scheduler.step(val["loss"] if settings.mode == "min" else val["f1"])
    else:
        trainer.scheduler.step()


def summary_row(epoch: int, train: dict, val: dict, lr: float, val_ema: dict | None = None) -> dict:
    return {"epoch": epoch + 1, "train_loss": train["loss"], "val_loss": val["loss"],
            "val_f1": val["f1"], "val_acc": val["acc"], "f1_mask": val.get("f1_mask", ""),
            "f1_gender": val.get("f1_gender", ""), "f1_age": val.get("f1_age", ""),
            "lr": lr, "seconds": round(train["seconds"], 2),
            "images_per_s": round(train["images_per_s"], 1),
            "val_f1_ema": val_ema["f1"] if val_ema else ""}


def epoch_line(settings: Settings, row: dict, improved: bool, kept: dict) -> str:
    """The epoch in one line; ``kept`` is what the epoch's candidate for best.pth scored."""
    ema = f" (EMA {row['val_f1_ema']:.4f})" if row["val_f1_ema"] != "" else ""
    worst = predict.worst_class(kept["per_class"]) if "per_class" in kept else None
    return (f"epoch {row['epoch']}/{settings.epochs}: train loss {row['train_loss']:.4f}, "
            f"val loss {row['val_loss']:.4f}, val F1 {row['val_f1']:.4f}{ema}, "
            f"acc {row['val_acc']:.4f}"
            + (f", worst class {worst[0]} F1 {worst[1]:.2f}" if worst else "")
            + f", lr {row['lr']:.3g}, {row['images_per_s']:.0f} img/s" + (" *" if improved else ""))


def save_epoch(run_dir: Path, record: dict, trainer: engine.Trainer, stopper: EarlyStopping,
               state: dict, val: dict, improved: bool, rng: list[dict],
               weights_of: str = "model") -> None:
    """best.pth (the model's or the EMA's weights, ``weights_of``, whichever scored ``val``) and
    per_class.csv when the epoch improved; last.pth (everything --resume needs, every process's
    random state in ``rng``), summary.csv."""
    weights = trainer.net.state_dict()
    if improved:
        best = trainer.ema.module.state_dict() if weights_of == "ema" else weights
        save_checkpoint({**record, "model": best, "weights": weights_of,
                                "epoch": state["epoch"], "metrics": strip_arrays(val)},
                               run_dir / run_folder.BEST)
        if "per_class" in val:
            run_folder.write_per_class(run_dir / run_folder.PER_CLASS, val["per_class"])
    save_checkpoint({**record, "model": weights, **trainer.state_dict(),
                            "train_state": {**state, **stopper.state_dict()},
                            "rng": rng, "epoch": state["epoch"]},
                           run_dir / run_folder.LAST)
    run_folder.write_summary(run_dir / run_folder.SUMMARY, state["summary"])


def gather_train_metrics(train: dict, procs: Processes) -> dict:
    """Loss averaged over all processes' images; images/s summed (they run side by side)."""
    parts = procs.gather(train)
    images = sum(p["images"] for p in parts)
    seconds = max(p["seconds"] for p in parts)
    return {"loss": sum(p["loss"] * p["images"] for p in parts) / max(images, 1),
            "images": images, "seconds": seconds, "images_per_s": images / max(seconds, 1e-9)}


def strip_arrays(metrics: dict) -> dict:
    """The scalar metrics as plain Python numbers (checkpoints hold no numpy objects)."""
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in metrics.items()
            if not isinstance(v, np.ndarray)}


# ----------------------------------------------------------------------------------------------
# K folds: who validates where, one model per fold, out-of-fold predictions
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FoldPlan:
    """Who validates where in a k-fold run, decided once before any photo is decoded."""
    folds: pd.Series             # profile -> fold, as folds.csv
    fold_of_row: np.ndarray      # fold of every photo (row of the frame)
    rows: list[tuple[np.ndarray, np.ndarray]]  # per fold: (train rows after policies, val rows)

    @property
    def n_folds(self) -> int:
        return len(self.rows)


def fold_assignments(args, frame: pd.DataFrame, warn=print) -> pd.Series:
    """Fold per profile: the resumed run's own folds.csv, else --folds FILE (checked against the
    data), else StratifiedGroupKFold."""
    folds_file = args.folds
    if args.resume and (Path(args.resume) / run_folder.FOLDS).is_file():
        folds_file = str(Path(args.resume) / run_folder.FOLDS)  # a resume never re-splits
    if not folds_file:
        return dataset.kfold_assignments(frame, args.kfold, args.seed, args.category, warn=warn)
    folds = dataset.read_folds(folds_file)
    missing = sorted(set(frame["profile"]) - set(folds.index))
    if missing:
        hint = " (people added since the run started? --accept_data_change leaves them out)" \
            if args.resume else ""
        raise UserError(f"{folds_file}: {len(missing)} profile(s) of the data have no fold "
                        f"(first: {missing[0]}){hint}")
    n_folds = folds.nunique()
    if n_folds < 2:  # as --kfold 1: nothing would train (no photo outside the one fold)
        raise UserError(f"{folds_file}: {n_folds} fold(s); expected 2 or more, as --kfold")
    if args.kfold and args.kfold != n_folds:
        raise UserError(f"{folds_file} has {n_folds} folds but --kfold is {args.kfold}")
    if sorted(folds.unique()) != list(range(n_folds)):
        raise UserError(f"{folds_file}: folds must be numbered 0..{n_folds - 1}")
    return folds.loc[sorted(set(frame["profile"]))]


def checked_folds(args, frame: pd.DataFrame, warn=print,
                  recorded: pd.DataFrame | None = None) -> FoldPlan:
    """fold_assignments and every fold's rows, with --fold and each fold's training photos
    checked; a resumed run's folds checked against its folds.csv and the roles its photos.csv
    recorded (``recorded``)."""
    folds = fold_assignments(args, frame, warn)
    if args.resume:
        check_run_folds(Path(args.resume), folds, recorded)
    n_folds = int(folds.max()) + 1
    if args.fold is not None and not 0 <= args.fold < n_folds:
        raise UserError(f"--fold {args.fold}: expected 0..{n_folds - 1}")
    fold_of_row = frame["profile"].map(folds).to_numpy()
    rows = [(train_rows_after_policies(args, frame, np.flatnonzero(fold_of_row != fold)),
             np.flatnonzero(fold_of_row == fold)) for fold in range(n_folds)]
    return FoldPlan(folds, fold_of_row, rows)


def check_run_folds(run_dir: Path, folds: pd.Series, recorded: pd.DataFrame | None) -> None:
    """run_folder.check_folds with the run's folds.csv read (when it has one)."""
    folds_file = run_dir / run_folder.FOLDS
    written = dataset.read_folds(folds_file) if folds_file.is_file() else None
    run_folder.check_folds(run_dir, folds, written, recorded)


def run_kfold(settings: Settings, frame: pd.DataFrame, plan: FoldPlan,
              images: np.ndarray, run_dir: Path, extra: dict, procs: Processes,
              progress: Progress = None, reporter: Reporter | None = None) -> dict:
    """Train K fold models in run_dir/fold{k} (fresh model, optimizer, schedule and early stopping
    each, on ``plan``'s rows); finished folds are skipped on --resume. Writes folds.csv and, once
    every fold is done, oof.csv (every photo scored by the fold model that never saw it), its
    per-class scores and figures, then the run's own done.json."""
    check_run_folds(run_dir, plan.folds, None)  # a fold started beside this one wrote others?
    if procs.main and not (run_dir / run_folder.FOLDS).is_file():  # written once per run
        atomic_write_text(run_dir / run_folder.FOLDS, plan.folds.to_frame("fold").to_csv())
    results = {}
    ours = range(plan.n_folds) if settings.fold is None else [settings.fold]
    if reporter is not None:  # the run's ETA counts every fold this call still trains
        pending = [k for k in ours
                   if not (run_folder.fold_dir(run_dir, k) / run_folder.DONE).is_file()]
        reporter.plan([model_work(settings, *plan.rows[k], procs, fold=k) for k in pending],
                      n_folds=plan.n_folds)
    for fold in ours:
        fold_dir = run_folder.fold_dir(run_dir, fold)
        done = fold_dir / run_folder.DONE
        if done.is_file():
            procs.say(f"fold {fold}: finished earlier, skipped")
            continue
        fold_dir.mkdir(exist_ok=True)
        train_rows, val_rows = plan.rows[fold]
        mean, std = normalization(settings, images, train_rows)
        procs.say(f"fold {fold}/{plan.n_folds}: {len(val_rows)} val photos")
        data = FitData(frame, images, train_rows, val_rows, mean, std)
        result = fit(settings, data, fold_dir, extra={**extra, "fold": fold}, procs=procs,
                     hparams=False, progress=progress, reporter=reporter)
        results[fold] = {"best_f1": result["best_f1"], "best_epoch": result["best_epoch"],
                         "epochs_done": len(result["summary"]), "wall_s": result["wall_s"]}
        if procs.main:
            atomic_write_text(done, json.dumps(results[fold]))
        procs.barrier()
        if progress is not None:
            progress({"event": "fold", "run_dir": run_dir, "fold": fold, **results[fold]})
    pending = [k for k in range(plan.n_folds)
               if not (run_folder.fold_dir(run_dir, k) / run_folder.DONE).is_file()]
    if pending:
        if procs.main:  # a fold retrained since: the run is not finished any more
            (run_dir / run_folder.DONE).unlink(missing_ok=True)
        procs.say(f"folds {pending} still to train; oof.csv is written when all are done "
                  f"(train them with --fold, then run once more with --resume {run_dir})")
        return {"run_dir": run_dir, "best_f1": float("nan"), "folds": results}
    metrics = {}
    check_run_folds(run_dir, plan.folds, None)  # edited while the folds trained?
    if procs.main:
        metrics = write_out_of_fold(settings, frame, images, run_dir, plan, procs)
        reporting.log_kfold_hparams(run_dir, settings.flags, plan.n_folds, metrics)
        write_kfold_done(run_dir, plan.n_folds, metrics)
    metrics = procs.broadcast(metrics)
    return {"run_dir": run_dir, "best_f1": metrics["f1"], "oof": metrics, "folds": results}


def write_kfold_done(run_dir: Path, n_folds: int, metrics: dict) -> None:
    """The k-fold run's own done.json, written after oof.csv and its figures: the whole run
    finished (its OOF F1, the folds' summed epochs and wall time)."""
    folds = []
    for k in range(n_folds):
        try:
            folds.append(json.loads((run_folder.fold_dir(run_dir, k) / run_folder.DONE).read_text()))
        except (OSError, ValueError):  # a hand-edited one costs the sums only
            folds.append({})
    atomic_write_text(run_dir / run_folder.DONE, json.dumps(
        {"oof_f1": metrics["f1"], "n_folds": n_folds,
         "epochs_done": sum(f.get("epochs_done", 0) for f in folds),
         "wall_s": sum(f.get("wall_s", 0.0) for f in folds)}))


def write_out_of_fold(settings: Settings, frame: pd.DataFrame, images: np.ndarray,
                      run_dir: Path, plan: FoldPlan, procs: Processes) -> dict:
    """oof.csv (path, profile, fold, label, p0..), oof_metrics.json, per_class.csv and the run's
    confusion.png, mistakes.png and mistakes.csv; prints the OOF F1."""
    oof = np.zeros((len(frame), labels.CATEGORY_CLASSES[settings.category]))
    for fold in range(plan.n_folds):
        rows = np.flatnonzero(plan.fold_of_row == fold)
        best = run_folder.fold_dir(run_dir, fold) / run_folder.BEST
        oof[rows] = fold_probabilities(settings, best, images, rows, procs)
    truth = frame["label"].to_numpy()
    metrics = predict.score(oof, truth, settings.category)
    table = pd.DataFrame({"path": frame["path"], "profile": frame["profile"],
                          "fold": plan.fold_of_row,
                          "label": labels.category_target(truth, settings.category)})
    probs = pd.DataFrame(oof, columns=[f"p{c}" for c in range(oof.shape[1])])
    atomic_write_text(run_dir / run_folder.OOF, pd.concat([table, probs], axis=1).to_csv(index=False))
    atomic_write_text(run_dir / run_folder.OOF_METRICS, json.dumps(metrics, indent=2))
    run_folder.write_per_class(run_dir / run_folder.PER_CLASS, metrics["per_class"])
    reporting.write_oof_figures(run_dir, oof, table["label"].to_numpy(), images, settings.category,
                                data_paths(settings, frame, np.arange(len(frame))),
                                plan.fold_of_row, metrics["f1"], settings.preprocess.margin_pixels)
    heads = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("f1_"))
    worst = predict.worst_class(metrics["per_class"])
    print(f"out-of-fold: macro F1 {metrics['f1']:.4f}, acc {metrics['acc']:.4f}"
          + (f" ({heads})" if heads else "")
          + (f", worst class {worst[0]} F1 {worst[1]:.2f}" if worst else "")
          + f" -> {run_dir / run_folder.OOF}")
    return metrics


def fold_probabilities(settings: Settings, checkpoint_path: Path, images: np.ndarray,
                       rows: np.ndarray, procs: Processes = Processes()) -> np.ndarray:
    """Scored-space probabilities of ``rows`` from a fold's best checkpoint."""
    device = distributed.process_device(settings.device, procs)
    model = predict.restore(load_checkpoint(checkpoint_path), checkpoint_path, device)
    return predict.model_probabilities(model, images, rows, device=device,
                                       batch_size=settings.valid_batch_size)


# ----------------------------------------------------------------------------------------------
# train: one split, or k folds with out-of-fold predictions
# ----------------------------------------------------------------------------------------------
def train(args, progress: Progress = None) -> dict:
    """Train as ``args`` (config.parse_args) says; returns {'run_dir', 'best_f1', ...}. The
    settings are resolved once, before any photo is decoded; what the data decides (its folder,
    the number of folds of a --folds file) is recorded in them before config.json is written."""
    distributed.tune_host_allocator()
    procs = distributed.start_processes(args.device)
    settings = resolve_settings(args, say=procs.say)
    if settings.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest
    if settings.compile and distributed.resolve_device(settings.device).type == "cpu":
        procs.say("note: --compile measured no gain on a CPU (docs/performance.md) and compiles "
                  "for a minute or more before the first batch")
    with phases.phase("records"):
        data_dir, frame = load_records(settings, say=procs.say)
    frame, recorded = (run_folder.continued_photos(settings, frame, data_dir, procs.say)
                       if settings.resume else (frame, None))
    # split or folds decided (and checked) before any photo is decoded or folder written
    plan = checked_folds(settings, frame, warn=procs.say, recorded=recorded) \
        if settings.kfold or settings.folds else None
    if plan is None:
        train_rows, val_rows = split_rows(settings, frame, recorded)
        roles = np.where(np.isin(np.arange(len(frame)), val_rows), "val", "train")
        train_rows = train_rows_after_policies(settings, frame, train_rows)
    check_class_weights(settings, frame, [r for r, _ in plan.rows] if plan else [train_rows])
    photos = run_folder.photo_record(frame, data_dir, plan.fold_of_row if plan else roles)
    settings = settings.replace(data_dir=str(data_dir),
                                kfold=plan.n_folds if plan else settings.kfold)
    settings = with_run_id(settings)
    record = None
    if settings.resume:  # refused here, before config.json or photos.csv is rewritten
        record = check_resumable(settings, photos, procs)
    if not procs.main:  # rank 0 decodes into the cache; the others then read it
        procs.barrier()
    with phases.phase("cache"):
        images, face_info = build_image_cache(settings, frame, say=procs.say)
    if procs.main:
        procs.barrier()
        run_dir = run_folder.prepare_run_dir(settings, photos, tracked(settings, record, procs))
    run_dir = Path(procs.broadcast(str(run_dir) if procs.main else None))
    preprocess = settings.preprocess
    procs.say(f"run: {run_dir} | {frame['profile'].nunique()} people, {len(frame)} photos | "
              f"{settings.model} {settings.category} {preprocess.resize[0]}x{preprocess.resize[1]}"
              f" crop {preprocess.crop} | {distributed.process_device(settings.device, procs)} x "
              f"{procs.world} process(es) | {settings.precision.describe()}")
    extra = {"face": face_info, "data_fingerprint": run_folder.data_fingerprint(photos)}
    # what the run shows while it trains: rank 0 only, however many processes run
    reporter = Reporter(settings.progress if procs.main else "off", epochs=settings.epochs,
                        log_interval=settings.log_interval, log_seconds=settings.log_seconds,
                        world=procs.world)
    try:
        if plan is not None:
            return run_kfold(settings, frame, plan, images, run_dir, extra, procs, progress,
                             reporter)
        mean, std = normalization(settings, images, train_rows)
        procs.say(f"split: {len(np.unique(train_rows))} train photos ({len(train_rows)} with "
                  f"repeats), {len(val_rows)} val photos")
        reporter.plan([model_work(settings, train_rows, val_rows, procs)])
        result = fit(settings, FitData(frame, images, train_rows, val_rows, mean, std), run_dir,
                     extra=extra, procs=procs, progress=progress, reporter=reporter)
        if procs.main:  # a finished run says so, with its wall time (what experiments.py lists)
            atomic_write_text(run_dir / run_folder.DONE, json.dumps(
                {"best_f1": result["best_f1"], "best_epoch": result["best_epoch"],
                 "epochs_done": len(result["summary"]), "wall_s": result["wall_s"]}))
    except BaseException:  # any failure, ours or torch's (out of memory), before a checkpoint
        if procs.main and not settings.resume and settings.fold is None:
            run_folder.remove_if_no_checkpoint(run_dir)
        raise
    return {"run_dir": run_dir, **result}


def model_work(settings: Settings, train_rows: np.ndarray, val_rows: np.ndarray,
               procs: Processes, fold: int | None = None) -> ModelWork:
    """A model's work per epoch for the run's ETA: this process's share of its photos (each
    process trains and validates 1/world of them)."""
    return ModelWork(fold, math.ceil(len(train_rows) / procs.world),
                     math.ceil(len(val_rows) / procs.world), settings.epochs)


def with_run_id(settings: Settings) -> Settings:
    """The run's identity: a resumed run's own (run_folder.check_run_record found it), else a new
    one (folds trained apart share one derived from their flags: run_folder.new_run_id)."""
    if getattr(settings, run_folder.RUN_ID, None):
        return settings
    shared = settings.fold is not None and not settings.resume
    record = {k: v for k, v in settings.record().items() if k not in config.RESUME_SAFE}
    return settings.replace(**{run_folder.RUN_ID: run_folder.new_run_id(record if shared else None)})


def tracked(settings: Settings, record: dict | None, procs: Processes) -> dict:
    """What config.json records (``record``, else the settings'), with its "tracking" block: the
    code, command and start of the run and the preprocessing its cache held; a resumed run keeps
    its own block, adds this call, and says so when the code changed since it started."""
    previous = None
    if settings.resume:
        try:
            previous = json.loads((Path(settings.resume) / run_folder.CONFIG).read_text()).get(
                run_folder.TRACKING)
        except (OSError, ValueError, AttributeError):  # checked before; a torn one only loses this
            previous = None
    preprocess = settings.preprocess
    used = {**dataclasses.asdict(preprocess), "resize": list(preprocess.resize),
            "cached_size": list(preprocess.cached_size)}
    tracking = config.tracking_record(used, previous)
    change = config.commit_change(previous, tracking.get("resumes", [tracking])[-1])
    if change:
        procs.say(change)
    return {**(settings.record() if record is None else record), run_folder.TRACKING: tracking}


def check_resumable(settings: Settings, photos: pd.DataFrame, procs: Processes) -> dict:
    """--resume: what every last.pth needs of this call, checked before the run folder is
    touched (the data's fingerprint, the number of processes); returns what config.json is to
    record: the settings, except "epochs" when this call asks for fewer than were trained (the
    run stays the length it was trained to)."""
    run_dir = Path(settings.resume)
    today = run_folder.data_fingerprint(photos)
    trained_epochs = 0
    for path in run_folder.last_checkpoints(run_dir):
        saved = load_checkpoint(path, mmap=True)
        trained = saved.get("data_fingerprint")
        if trained and trained != today and not settings.accept_data_change:
            raise UserError(f"--resume {run_dir}: the training data's fingerprint {today} differs "
                            f"from the run's {trained} ({path}); add --accept_data_change to go "
                            "on anyway, or start a new run")
        states = saved["rng"] if isinstance(saved.get("rng"), list) else [saved.get("rng")]
        if len(states) != procs.world:
            raise UserError(f"--resume {run_dir}: the run trained on {len(states)} process(es), "
                            f"this is {procs.world}; resume it with torchrun --nproc_per_node "
                            f"{len(states)} (or without torchrun for 1) to continue it exactly")
        trained_epochs = max(trained_epochs, int(saved.get("train_state", {}).get("epoch", 0)))
    record = settings.record()
    if settings.epochs < trained_epochs:
        recorded = run_folder.read_recorded_epochs(run_dir)
        record["epochs"] = recorded if recorded is not None else trained_epochs
    return record


def split_rows(args, frame: pd.DataFrame,
               recorded: pd.DataFrame | None) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, val rows) of a single run: the resumed run's own split, else --dataset's."""
    if recorded is not None:
        is_val = (recorded["role"] == "val").to_numpy()
        return np.flatnonzero(~is_val), np.flatnonzero(is_val)
    return dataset.SPLITS[args.dataset](frame, args.val_ratio, args.seed)
