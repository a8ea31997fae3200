"""What training, inference and the benchmark share: the device, the torchrun
process group, the trainer's parts, one epoch of training, predicting, evaluating and scoring.

build_trainer is the one place a model, loss, optimizer, schedule, scaler, augmentation and mixer
are made from a run's settings (train.py's flags; benchmark.py passes the same), so what the
benchmark times is what train.py trains.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import timm.optim
import timm.scheduler
import torch
from sklearn.metrics import classification_report, f1_score
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch import nn
from tqdm import tqdm

import augmentation
import dataset
import loss as losses
import mixed_precision
import model as models
from checked_io import UserError

# the toolkit's first names keep their meaning (torch's optimizers; timm's 'sgd' is Nesterov);
# every other name is timm's create_optimizer_v2, less those that need CUDA-only packages
# (bitsandbytes bnb*, APEX fused*) or a second-order backward (adahessian)
TORCH_OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "adagrad")
TIMM_OPTIMIZERS = tuple(name for name in timm.optim.list_optimizers()
                        if name not in TORCH_OPTIMIZERS and name != "adahessian"
                        and not name.startswith(("bnb", "fused")))
OPTIMIZERS = TORCH_OPTIMIZERS + TIMM_OPTIMIZERS
TORCH_SCHEDULERS = ("steplr", "lambdalr", "exponentiallr", "cycliclr", "cosineannealinglr",
                    "reducelronplateau")
# timm's create_scheduler_v2, stepped per optimizer update, with its own warm-up and lr floor
# (its plateau is left out: timm deprecates it and cannot resume it; reducelronplateau can)
TIMM_SCHEDULERS = ("cosine", "tanh", "poly", "step", "wsd", "constant")
SCHEDULERS = TORCH_SCHEDULERS + TIMM_SCHEDULERS
CLIP_MODES = ("norm", "value", "agc")  # timm's dispatch_clip_grad


def tune_host_allocator() -> None:
    """Let glibc reuse freed memory for big tensors instead of mapping fresh pages every batch.

    Above its mmap threshold (32 MB at most) glibc maps each allocation anew and unmaps it on free,
    so every 224x224 batch paid ~10k page faults per temporary; measured here, raising the threshold
    doubled the CPU batch-augmentation throughput. A no-op where glibc's mallopt is missing.
    """
    import ctypes
    import sys
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


# ----------------------------------------------------------------------------------------------
# Device
# ----------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """--device: auto (CUDA when there is one), cpu, cuda or cuda:N; UserError when unusable."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device '{name}': expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


# ----------------------------------------------------------------------------------------------
# Processes: one, or several under torchrun (DistributedDataParallel)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Processes:
    """This process's place among the torchrun processes (rank 0 of 1 without torchrun)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def broadcast(self, value):
        """rank 0's value, on every rank."""
        if not self.distributed:
            return value
        holder = [value]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather(self, value) -> list:
        if not self.distributed:
            return [value]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out

    def say(self, message: str) -> None:
        """Print on rank 0 only: one line per event, however many processes run."""
        if self.main:
            print(message, flush=True)


def start_processes(device_name: str) -> Processes:
    """Join the torchrun group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return Processes(rank, world, local_rank)


def process_device(device_name: str, procs: Processes) -> torch.device:
    """--device for this process: its own GPU (LOCAL_RANK) under torchrun."""
    device = resolve_device(device_name)
    if procs.distributed and device.type == "cuda":
        return torch.device("cuda", procs.local_rank)
    return device


# ----------------------------------------------------------------------------------------------
# Random state: seeded runs, and exact resumes
# ----------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every random generator's state, as tensors and plain values (checkpoints are loaded with
    weights_only=True, which takes no numpy arrays)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss,
                       cached_gaussian],
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]  # an ndarray in checkpoints of earlier versions
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# The trainer's parts, built from a run's settings
# ----------------------------------------------------------------------------------------------
def build_optimizer(settings: Any, params, device: torch.device) -> torch.optim.Optimizer:
    """The --optimizer over ``params`` (tensors, or groups with their own lr and weight decay)."""
    if settings.optimizer in TIMM_OPTIMIZERS:
        return timm.optim.create_optimizer_v2(params, opt=settings.optimizer, lr=settings.lr,
                                              weight_decay=settings.weight_decay,
                                              momentum=settings.momentum)
    # fused kernels on CUDA: one launch for all parameters instead of one per tensor
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if settings.optimizer in ("sgd", "momentum"):
        momentum = settings.momentum if settings.optimizer == "momentum" else 0.0
        return torch.optim.SGD(params, lr=settings.lr, momentum=momentum,
                               weight_decay=settings.weight_decay, **fast)
    if settings.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=settings.lr, weight_decay=settings.weight_decay,
                                   foreach=True)
    optimizer = torch.optim.AdamW if settings.optimizer == "adamw" else torch.optim.Adam
    return optimizer(params, lr=settings.lr, weight_decay=settings.weight_decay, **fast)


def is_timm_schedule(scheduler) -> bool:
    """timm's schedules warm up themselves and step per optimizer update (step_update)."""
    return isinstance(scheduler, timm.scheduler.scheduler.Scheduler)


def build_scheduler(settings: Any, optimizer, steps_per_epoch: int):
    """Returns (scheduler, steps per batch?). Epoch schedulers step after each epoch; per-batch
    ones after each optimizer update (``steps_per_epoch`` of them per epoch)."""
    if settings.scheduler in TIMM_SCHEDULERS:
        extra = {"decay_epochs": settings.lr_decay_step} if settings.scheduler == "step" else {}
        scheduler, _ = timm.scheduler.create_scheduler_v2(
            optimizer, sched=settings.scheduler, num_epochs=settings.tmax or settings.epochs,
            decay_rate=settings.gamma, min_lr=settings.min_lr, warmup_lr=settings.warmup_lr,
            warmup_epochs=settings.warmup_epochs, step_on_epochs=False,
            updates_per_epoch=steps_per_epoch, **extra)
        return scheduler, True
    s = torch.optim.lr_scheduler
    if settings.scheduler == "steplr":
        return s.StepLR(optimizer, step_size=settings.lr_decay_step, gamma=settings.gamma), False
    if settings.scheduler == "lambdalr":
        gamma = settings.gamma
        return s.LambdaLR(optimizer, lr_lambda=lambda epoch: gamma ** epoch), False
    if settings.scheduler == "exponentiallr":
        return s.ExponentialLR(optimizer, gamma=settings.gamma), False
    if settings.scheduler == "cosineannealinglr":
        return s.CosineAnnealingLR(optimizer, T_max=settings.tmax or settings.epochs), False
    if settings.scheduler == "reducelronplateau":
        return s.ReduceLROnPlateau(optimizer, mode=settings.mode, factor=settings.factor,
                                   patience=settings.patience, threshold=settings.threshold), False
    # cycliclr: one triangle every 2 epochs, stepping per batch; each parameter group between its
    # own lr and that times maxlr / lr, so --head_lr_mult holds
    base = [group["lr"] for group in optimizer.param_groups]
    if settings.lr:
        top = [lr * (settings.maxlr / settings.lr if settings.maxlr else 10) for lr in base]
    else:
        top = [settings.maxlr or 0.0] * len(base)
    return s.CyclicLR(optimizer, base_lr=base, max_lr=top, step_size_up=steps_per_epoch,
                      cycle_momentum=False), True


def build_network(settings: Any, n_out: int, device: torch.device, procs: Processes,
                  channels_last: bool) -> tuple[nn.Module, nn.Module]:
    """(the plain model, what the loop calls: DDP- and/or torch.compile-wrapped)."""
    net = models.build_model(settings.model, n_out, multi_head=settings.multi_head,
                             canny=settings.canny, cosine_head=settings.criterion == "arcface",
                             cosine_scale=settings.arc_scale, pretrained=settings.pretrained,
                             weights=settings.weights, drop_rate=settings.drop_rate)
    if settings.sync_bn and procs.distributed and device.type != "cuda":
        procs.say("--sync_bn: SyncBatchNorm runs on CUDA only; ignored on CPU")
    elif settings.sync_bn and procs.distributed:
        config = net.model_config
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net.model_config = config
    net.to(device)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    runner = net
    if procs.distributed:
        runner = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    if settings.compile:
        runner = torch.compile(runner)
    runner.model_config = net.model_config
    return net, runner


def build_criterion(settings: Any, n_out: int, class_weights=None) -> nn.Module:
    """The run's loss: one per head of a multi-head model, over 18-class targets;
    ``class_weights`` from class_weights_of."""
    return losses.build_loss(
        settings.criterion, dataset.NUM_CLASSES if settings.multi_head else n_out,
        multi_head=settings.multi_head, smoothing=settings.smoothing, gamma=settings.focal_gamma,
        scale=settings.arc_scale, margin=settings.arc_margin, weight=class_weights)


def class_weights_of(settings: Any, targets: np.ndarray):
    """--class_weights from the targets of the training rows (as trained, repeats included):
    None, a vector per class, or for a multi-head model one per head from the head marginals.
    A class with no training target is a UserError naming it."""
    if settings.class_weights == "none":
        return None
    if settings.multi_head:
        parts = [(head, t, size) for head, t, size in zip(
            ("mask", "gender", "age"), dataset.decode_class(np.asarray(targets)), dataset.HEAD_SIZES)]
    else:
        n_out = dataset.num_outputs(settings.category, settings.age_label_num)
        parts = [(settings.category, np.asarray(targets), n_out)]
    weights = []
    for category, head_targets, size in parts:
        try:
            weights.append(losses.class_weights(head_targets, size, settings.class_weights,
                                                settings.class_weights_beta))
        except ValueError:
            counts = np.bincount(head_targets, minlength=size)
            names = dataset.class_names(category, 3 if settings.multi_head
                                        else settings.age_label_num)
            absent = [names[c] for c in np.flatnonzero(counts == 0)]
            raise UserError(f"--class_weights {settings.class_weights}: class(es) "
                            f"{', '.join(absent)} have no training photo; use --class_weights "
                            "none or train on data holding every class") from None
    return weights if settings.multi_head else weights[0]


@dataclass
class Trainer:
    """Everything one optimisation step needs; ``net`` is the plain model that checkpoints hold,
    ``runner`` what the loop calls (DDP / compiled)."""
    net: nn.Module
    runner: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    per_batch_schedule: bool
    scaler: torch.amp.GradScaler | None
    augment: nn.Module
    mixer: Any
    autocast_dtype: torch.dtype | None
    channels_last: bool
    ema: ModelEmaV3 | None = None    # --model_ema: a moving average of net's weights
    accum_steps: int = 1             # batches whose gradients make one optimizer update
    clip_grad: float | None = None   # gradient clipping (timm's dispatch_clip_grad)
    clip_mode: str = "norm"
    updates: int = 0                 # optimizer updates so far (timm schedules, EMA warm-up)

    def state_dict(self) -> dict:
        """What --resume needs besides the model weights."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "updates": self.updates,
                "ema": self.ema.module.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.updates = int(state.get("updates", 0))
        if self.ema is not None:
            if state.get("ema") is None:
                raise UserError("--model_ema: the run was trained without it, so last.pth holds "
                                "no EMA weights to resume; resume without --model_ema")
            self.ema.module.load_state_dict(state["ema"])


def build_trainer(settings: Any, n_out: int, device: torch.device, *, steps_per_epoch: int,
                  mean=augmentation.IMAGENET_MEAN, std=augmentation.IMAGENET_STD,
                  channels: int = 3, procs: Processes = Processes(),
                  class_weights=None, margin: tuple[int, int] = (0, 0)) -> Trainer:
    """Model, loss, optimizer, schedule, scaler, EMA, augmentation and mixer as ``settings``
    (train.py's flags) say, on ``device``; ``steps_per_epoch`` counts batches, ``margin`` is the
    cache's (rows, columns) beyond the crop on each side (--crop_margin)."""
    precision = mixed_precision.precision_of(settings, device)
    net, runner = build_network(settings, n_out, device, procs, precision.channels_last)
    groups = models.parameter_groups(net, settings.lr, settings.weight_decay,
                                     head_lr_mult=settings.head_lr_mult,
                                     layer_decay=settings.layer_decay)
    optimizer = build_optimizer(settings, groups, device)
    updates_per_epoch = math.ceil(steps_per_epoch / settings.grad_accum_steps)
    scheduler, per_batch = build_scheduler(settings, optimizer, updates_per_epoch)
    autocast = precision.autocast_dtype
    mixed_classes = dataset.NUM_CLASSES if settings.multi_head else n_out
    ema = None
    if settings.model_ema:  # after .to(device) and channels_last: the copy matches the model
        ema = ModelEmaV3(net, decay=settings.model_ema_decay, use_warmup=settings.model_ema_warmup)
    criterion = build_criterion(settings, n_out, class_weights).to(device)
    return Trainer(
        net=net, runner=runner, criterion=criterion,
        optimizer=optimizer, scheduler=scheduler, per_batch_schedule=per_batch,
        scaler=torch.amp.GradScaler(device.type) if autocast == torch.float16 else None,
        augment=augmentation.build_augmentation(
            settings.augmentation, mean, std, channels, margin=margin,
            rrc_scale=settings.rrc_scale, rrc_ratio=settings.rrc_ratio).to(device),
        mixer=augmentation.build_mixer(mixed_classes, settings.mixup, settings.cutmix,
                                       settings.mixup_alpha, settings.cutmix_alpha),
        autocast_dtype=autocast, channels_last=precision.channels_last, ema=ema,
        accum_steps=settings.grad_accum_steps, clip_grad=settings.clip_grad,
        clip_mode=settings.clip_mode)


# ----------------------------------------------------------------------------------------------
# One epoch of training, one pass of prediction
# ----------------------------------------------------------------------------------------------
class NonFiniteLoss(UserError):
    pass


def _check_finite(value: float, where: str, optimizer) -> None:
    if not math.isfinite(value):
        raise NonFiniteLoss(f"loss is {value} {where} (lr {optimizer.param_groups[0]['lr']:.3g}); "
                            "stopped, the checkpoints of earlier epochs (if any) are kept; try a "
                            "lower --lr or --amp off")


def train_one_epoch(trainer: Trainer, batches, *, augment: nn.Module | None = None,
                    warmup: tuple[int, int] | None = None, epoch: int = 0,
                    log_interval: int = 20, writer=None, progress: bool = True) -> dict:
    """One pass over ``batches`` (uint8 images, targets, rows); returns {'loss', 'images',
    'seconds', 'images_per_s'}. ``augment`` replaces the trainer's (the benchmark's ready
    batches); ``warmup`` = (steps done before this epoch, warm-up steps in all) ramps the lr.

    Every ``trainer.accum_steps`` batches make one optimizer update: each batch's loss is divided
    by the number of batches of its group (the epoch's last group may be shorter), so the update
    is the one a batch of them all would give. With a GradScaler (fp16) the gradients are
    unscaled before clipping; per-update schedules and the EMA step once per update."""
    model, optimizer, scaler = trainer.runner, trainer.optimizer, trainer.scaler
    augment = trainer.augment if augment is None else augment
    batch_scheduler = trainer.scheduler if trainer.per_batch_schedule and warmup is None else None
    model.train()
    augment.train()
    device = next(model.parameters()).device
    total_loss = torch.zeros((), device=device)
    seen, started = 0, time.perf_counter()
    base_lrs = [group["initial_lr"] if "initial_lr" in group else group["lr"]
                for group in optimizer.param_groups]
    accum = trainer.accum_steps
    n_batches = len(batches) if accum > 1 else 0
    optimizer.zero_grad(set_to_none=True)
    # disable=None hides the bar when stderr is not a terminal (logs, CI)
    bar = tqdm(batches, desc=f"epoch {epoch + 1}", leave=False, disable=None if progress else True)
    for step, (images, targets, _) in enumerate(bar):
        if warmup is not None:  # linear warm-up over the first warmup epochs, per batch
            done, total = warmup[0] + step + 1, warmup[1]
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * min(1.0, done / total)
        group_start = step - step % accum
        group_size = min(accum, n_batches - group_start) if accum > 1 else 1
        last_of_group = step + 1 - group_start == group_size
        inputs = augment(images)
        if trainer.mixer is not None:
            inputs, targets = trainer.mixer(inputs, targets)
        if trainer.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        # DDP all-reduces on every backward; only the group's last one needs it
        sync = contextlib.nullcontext() if last_of_group or not hasattr(model, "no_sync") \
            else model.no_sync()
        with sync:
            with torch.autocast(device.type, dtype=trainer.autocast_dtype,
                                enabled=trainer.autocast_dtype is not None):
                logits = model(inputs)
                batch_loss = trainer.criterion(logits.float(), targets)
            scaled = batch_loss / group_size if group_size > 1 else batch_loss
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if last_of_group:
            optimizer_update(trainer)
            if batch_scheduler is not None:
                if is_timm_schedule(batch_scheduler):
                    batch_scheduler.step_update(trainer.updates)
                else:
                    batch_scheduler.step()
        total_loss += batch_loss.detach() * len(images)
        seen += len(images)
        # checking on the host waits for the device, so CUDA checks only every log_interval
        if device.type != "cuda" or (step + 1) % log_interval == 0:
            value = batch_loss.item()
            _check_finite(value, f"at epoch {epoch + 1}, batch {step + 1}", optimizer)
            bar.set_postfix(loss=f"{value:.4f}")
            if writer is not None and (step + 1) % log_interval == 0:
                writer.add_scalar("Loss/train_batch", value, epoch * len(batches) + step)
    mean_loss = (total_loss / max(seen, 1)).item()
    _check_finite(mean_loss, f"in epoch {epoch + 1}", optimizer)
    seconds = time.perf_counter() - started
    return {"loss": mean_loss, "images": seen, "seconds": seconds,
            "images_per_s": seen / max(seconds, 1e-9)}


def optimizer_update(trainer: Trainer) -> None:
    """One optimizer update from the accumulated gradients: unscale (fp16), clip, step, zero,
    then the EMA."""
    optimizer, scaler = trainer.optimizer, trainer.scaler
    if trainer.clip_grad is not None:
        if scaler is not None:  # clip the true gradients, not the loss-scaled ones
            scaler.unscale_(optimizer)
        dispatch_clip_grad(trainer.net.parameters(), trainer.clip_grad, mode=trainer.clip_mode)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    trainer.updates += 1
    if trainer.ema is not None:
        trainer.ema.update(trainer.net, step=trainer.updates)


@torch.no_grad()
def predict_probabilities(model: nn.Module, batches, augment: nn.Module, *, category: str,
                          age_label_num: int = 3, autocast_dtype=None, channels_last: bool = False,
                          criterion: nn.Module | None = None) -> tuple[np.ndarray, float]:
    """Scored-space probabilities for every batch (eval mode, in order) and the mean loss."""
    model.eval()
    augment.eval()
    device = next(model.parameters()).device
    probs, total_loss, seen = [], 0.0, 0
    for images, targets, _ in batches:
        inputs = augment(images)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(inputs).float()
        if criterion is not None:
            total_loss += criterion(logits, targets).item() * len(images)
            seen += len(images)
        p = models.class_probabilities(model.model_config, logits).cpu().numpy()
        probs.append(dataset.fold_age6(p, category) if age_label_num == 6 else p)
    return np.concatenate(probs), total_loss / max(seen, 1)


def mirrored(batches):
    """The same batches flipped left to right, for flip TTA."""
    for images, targets, rows in batches:  # uint8 [B, H, W, C]: W is dim 2
        yield images.flip(2), targets, rows


TTA_MODES = ("none", "flip")


def predict_views(model: nn.Module, batches, augment: nn.Module, *, tta: str = "none",
                  category: str, age_label_num: int = 3, autocast_dtype=None,
                  channels_last: bool = False) -> np.ndarray:
    """Scored-space probabilities averaged over the test-time views (--tta flip: the photo and
    its mirror image)."""
    views = [batches, mirrored(batches)] if tta == "flip" else [batches]
    probs = [predict_probabilities(model, view, augment, category=category,
                                   age_label_num=age_label_num, autocast_dtype=autocast_dtype,
                                   channels_last=channels_last)[0] for view in views]
    return np.stack([p.astype(np.float64) for p in probs]).mean(0)


def score(probs: np.ndarray, true_labels: np.ndarray, category: str) -> dict:
    """Macro F1 (sklearn, the competition's metric), accuracy, for 18 classes per-head F1, and
    'per_class' (per_class_scores)."""
    truth = dataset.category_target(true_labels, category)
    predicted = probs.argmax(1)
    metrics = {"f1": f1_score(truth, predicted, average="macro"),
               "acc": float((truth == predicted).mean())}
    if category == "multi":
        for head, t, p in zip(("mask", "gender", "age"), dataset.decode_class(truth),
                              dataset.decode_class(predicted)):
            metrics[f"f1_{head}"] = f1_score(t, p, average="macro")
    metrics["per_class"] = per_class_scores(truth, predicted, category)
    return metrics


def per_class_scores(truth: np.ndarray, predicted: np.ndarray, category: str) -> dict:
    """{class name: {precision, recall, f1, support}} for every class of ``category``, from
    scikit-learn's classification_report (a class never predicted scores 0, not a warning).
    Macro F1 is the mean of these F1s over the classes present in truth or predictions."""
    names = dataset.class_names(category)
    report = classification_report(truth, predicted, labels=np.arange(len(names)),
                                   target_names=names, output_dict=True, zero_division=0)
    return {name: {"precision": float(report[name]["precision"]),
                   "recall": float(report[name]["recall"]),
                   "f1": float(report[name]["f1-score"]),
                   "support": int(report[name]["support"])} for name in names}


def worst_class(per_class: dict) -> tuple[str, float] | None:
    """(name, F1) of the class with the lowest F1 among those with photos; None without any."""
    present = [(name, row["f1"]) for name, row in per_class.items() if row["support"]]
    return min(present, key=lambda item: item[1]) if present else None


def evaluate(model: nn.Module, batches, augment: nn.Module, true_labels: np.ndarray, *,
             category: str, age_label_num: int = 3, criterion=None, autocast_dtype=None,
             channels_last: bool = False, procs: Processes = Processes(),
             positions: np.ndarray | None = None) -> dict:
    """Val loss, macro F1, accuracy, per-head F1, plus 'probs', 'predictions' and 'truth'.

    Under torchrun each process predicts its share of the photos (``batches``, at ``positions``
    of ``true_labels``); the shares are gathered so every process returns the same metrics.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module  # eval needs no gradient sync, and ranks see different photos
    probs, loss = predict_probabilities(
        model, batches, augment, category=category, age_label_num=age_label_num,
        autocast_dtype=autocast_dtype, channels_last=channels_last, criterion=criterion)
    positions = np.arange(len(true_labels)) if positions is None else positions
    parts = procs.gather((positions, probs, loss * len(positions)))
    all_probs = np.zeros((len(true_labels), probs.shape[1]))
    for where, part, _ in parts:
        all_probs[where] = part
    val_loss = sum(p[2] for p in parts) / max(len(true_labels), 1)
    return {"loss": val_loss, **score(all_probs, true_labels, category), "probs": all_probs,
            "predictions": all_probs.argmax(1),
            "truth": dataset.category_target(true_labels, category)}
