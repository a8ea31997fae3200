"""The trainer: its parts built from a run's settings (torch and timm optimizers and schedules,
the network, the loss and its class weights, EMA, augmentation, MixUp/CutMix) and one epoch of
training (gradient accumulation, clipping, mixed precision).

build_trainer is the one place a model, loss, optimizer, schedule, scaler, augmentation and mixer
are made from a run's settings; benchmark.py builds its trainer here too, so what the benchmark
times is what train.py trains.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import timm.optim
import timm.scheduler
import torch
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch import nn

from maskface import augmentation, labels, loss as losses, model as models, presets
from maskface.cli import UserError
from maskface.distributed import Processes
from maskface.progress import StepObserver, bare_bar
from maskface.settings import Settings

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
    # --defaults seed: the seed code's schedules as its optims.py builds them
    seed = getattr(settings, "defaults", "toolkit") == "seed"
    if settings.scheduler == "cosineannealinglr":
        floor = settings.lr * presets.SEED_COSINE_FLOOR if seed else 0.0
        return s.CosineAnnealingLR(optimizer, T_max=settings.tmax or settings.epochs,
                                   eta_min=floor), False
    if settings.scheduler == "reducelronplateau":
        return s.ReduceLROnPlateau(optimizer, mode=settings.mode, factor=settings.factor,
                                   patience=settings.patience, threshold=settings.threshold), False
    # cycliclr: each parameter group between its own lr and that times maxlr / lr, so
    # --head_lr_mult holds; --tmax epochs up, stepped per epoch (as the seed code), else one
    # triangle every 2 epochs, stepped per batch
    base = [group["lr"] for group in optimizer.param_groups]
    if settings.lr:
        top = [lr * (settings.maxlr / settings.lr if settings.maxlr else 10) for lr in base]
    else:
        top = [settings.maxlr or 0.0] * len(base)
    # runs of older versions recorded plateau's mode here; they trained triangular
    mode = settings.mode if settings.mode in presets.CYCLIC_MODES else "triangular"
    # the seed's CyclicLR keeps torch's default, cycling SGD's momentum against the lr
    cycle_momentum = seed and settings.optimizer == "momentum"
    per_batch = not settings.tmax
    return s.CyclicLR(optimizer, base_lr=base, max_lr=top, mode=mode,
                      gamma=1.0 if seed else settings.gamma,  # the seed left torch's 1.0
                      step_size_up=steps_per_epoch if per_batch else settings.tmax,
                      cycle_momentum=cycle_momentum), per_batch


def build_network(settings: Any, n_out: int, device: torch.device, procs: Processes,
                  channels_last: bool) -> tuple[nn.Module, nn.Module]:
    """(the plain model, what the loop calls: DDP- and/or torch.compile-wrapped)."""
    net = models.build_model(settings.model, n_out, multi_head=settings.multi_head,
                             canny=settings.canny, cosine_head=settings.criterion == "arcface",
                             cosine_scale=settings.arc_scale, pretrained=settings.pretrained,
                             weights=settings.weights, drop_rate=settings.drop_rate,
                             model_args=models.model_args_of(getattr(settings, "model_args", None))
                             or None)
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
        settings.criterion, labels.NUM_CLASSES if settings.multi_head else n_out,
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
            ("mask", "gender", "age"), labels.decode_class(np.asarray(targets)), labels.HEAD_SIZES)]
    else:
        n_out = labels.num_outputs(settings.category, settings.age_label_num)
        parts = [(settings.category, np.asarray(targets), n_out)]
    weights = []
    for category, head_targets, size in parts:
        try:
            weights.append(losses.class_weights(head_targets, size, settings.class_weights,
                                                settings.class_weights_beta))
        except ValueError:
            counts = np.bincount(head_targets, minlength=size)
            names = labels.class_names(category, 3 if settings.multi_head
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


def build_trainer(settings: Settings, n_out: int, device: torch.device, *, steps_per_epoch: int,
                  mean=augmentation.IMAGENET_MEAN, std=augmentation.IMAGENET_STD,
                  channels: int = 3, procs: Processes = Processes(),
                  class_weights=None, margin: tuple[int, int] = (0, 0)) -> Trainer:
    """Model, loss, optimizer, schedule, scaler, EMA, augmentation and mixer as ``settings``
    (a run's resolved settings) say, on ``device``; ``steps_per_epoch`` counts batches, ``margin`` is the
    cache's (rows, columns) beyond the crop on each side (--crop_margin)."""
    precision = settings.precision  # decided once, when the settings were resolved
    net, runner = build_network(settings, n_out, device, procs, precision.channels_last)
    groups = models.parameter_groups(net, settings.lr, settings.weight_decay,
                                     head_lr_mult=settings.head_lr_mult,
                                     layer_decay=settings.layer_decay)
    optimizer = build_optimizer(settings, groups, device)
    updates_per_epoch = math.ceil(steps_per_epoch / settings.grad_accum_steps)
    scheduler, per_batch = build_scheduler(settings, optimizer, updates_per_epoch)
    autocast = precision.autocast_dtype
    mixed_classes = labels.NUM_CLASSES if settings.multi_head else n_out
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
def _check_finite(value: float, where: str, optimizer) -> None:
    if not math.isfinite(value):
        raise UserError(f"loss is {value} {where} (lr {optimizer.param_groups[0]['lr']:.3g}); "
                            "stopped, the checkpoints of earlier epochs (if any) are kept; try a "
                            "lower --lr or --amp off")


def train_one_epoch(trainer: Trainer, batches, *, augment: nn.Module | None = None,
                    warmup: tuple[int, int] | None = None, epoch: int = 0,
                    log_interval: int = 20, writer=None, progress: bool = True,
                    on_step: StepObserver | None = None) -> dict:
    """One pass over ``batches`` (uint8 images, targets, rows); returns {'loss', 'images',
    'seconds', 'images_per_s'}. ``augment`` replaces the trainer's (the benchmark's ready
    batches); ``warmup`` = (steps done before this epoch, warm-up steps in all) ramps the lr.
    ``on_step`` hears of every batch (maskface.progress prints what a run shows); without it,
    ``progress`` draws a bare bar on a terminal.

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
    if on_step is None and progress:
        on_step = bare_bar(len(batches), f"epoch {epoch + 1}")
    for step, (images, targets, _) in enumerate(batches):
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
            if writer is not None and (step + 1) % log_interval == 0:
                writer.add_scalar("Loss/train_batch", value, epoch * len(batches) + step)
        if on_step is not None:  # the loss stays a device tensor: reading it waits for the GPU
            on_step(step + 1, len(images), batch_loss.detach(), optimizer.param_groups[0]["lr"])
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
