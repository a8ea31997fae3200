"""Train one model (or one per fold) on photos in the competition's layout.

    python train.py                                  # BaseModel on the bundled sample
    python train.py --model resnet18 --weights r18.pth --resize 224 224 --epochs 10 --crop face
    python train.py --resume model/exp3              # continue a killed run

A run folder ``{model_dir}/{name}`` (then name2, name3, ...) holds config.json, best.pth, last.pth,
summary.csv and TensorBoard events; inference needs nothing else.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import confusion_matrix, f1_score
from torch import nn
from tqdm import tqdm

import dataset
import loss as losses
import model as models
from dataset import UserError

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "adagrad")
SCHEDULERS = ("steplr", "lambdalr", "exponentiallr", "cycliclr", "cosineannealinglr",
              "reducelronplateau")
AMP_MODES = ("auto", "bf16", "fp16", "off")
SUMMARY_FIELDS = ["epoch", "train_loss", "val_loss", "val_f1", "val_acc", "f1_mask", "f1_gender",
                  "f1_age", "lr", "seconds", "images_per_s"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a face-mask classifier.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def add(*flags: str, **options):
        # the competition's users type --batch_size; --batch-size works as well
        aliases = [f.replace("_", "-") for f in flags if "_" in f]
        return p.add_argument(*flags, *aliases, **options)

    # run
    add("--seed", type=int, default=42, help="random seed (split, init, order, augmentation)")
    add("--epochs", type=int, default=1, help="number of epochs")
    add("--name", default="exp", help="run folder name under --model_dir (exp, exp2, ...)")
    add("--model_dir", default=os.environ.get("SM_MODEL_DIR", "./model"),
        help="where run folders go ($SM_MODEL_DIR if set)")
    add("--config", default=None, help="a saved config.json replayed as defaults; flags override")
    add("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR from last.pth")
    add("--log_interval", type=int, default=20, help="batches between TensorBoard loss points")
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add("--deterministic", action="store_true", help="deterministic kernels (slower on GPU)")
    # data
    add("--data_dir", default=None,
        help="train images folder ($SM_CHANNEL_TRAIN, else the bundled sample)")
    add("--dataset", default="MaskSplitByProfileDataset", choices=list(dataset.DATASETS),
        help="MaskSplitByProfileDataset splits people; MaskBaseDataset splits images and LEAKS "
             "people across train and val")
    add("--val_ratio", type=float, default=0.2, help="share of people (or images) in validation")
    add("--kfold", type=int, default=0, help="train K fold models (0 = one train/val split)")
    add("--folds", default=None, metavar="CSV",
        help="reuse a folds.csv (profile,fold) of an earlier run, to compare models on the same folds")
    add("--fold", type=int, default=None,
        help="with --kfold: train only this fold (spread folds over GPUs with a shell loop)")
    add("--category", default="multi", choices=list(dataset.CATEGORY_CLASSES),
        help="predict the 18 classes or one of mask/gender/age")
    add("--age_label_num", "--age_lable_num", dest="age_label_num", type=int, default=3,
        choices=(3, 6), help="age classes trained: 3 groups, or 6 bins folded to 3 for scoring")
    add("--old_age", type=int, default=60,
        help="first age trained as 60+ (validation always scores with the true 60)")
    add("--drop_ages", default=None, metavar="LO-HI",
        help="leave people aged LO..HI out of training only, e.g. 57-59")
    add("--relabel", default=None, metavar="CSV", help="relabel file: id,gender,age,swap_mask")
    add("--data_balancing", default="imbalance", choices=dataset.BALANCING,
        help="oversample train people by gender x decade (10s) or gender x age group (gene)")
    add("--weightsampler", action="store_true", help="sample train images inversely to class size")
    add("--cache_dir", default=".cache", help="where decoded, cropped, resized images are kept")
    add("--num_workers", type=int, default=0,
        help="threads decoding images into the cache (0 = one per core); training reads the "
             "cache and needs no loader workers")
    # images
    add("--resize", type=int, nargs=2, default=[128, 96], metavar=("H", "W"), help="model input size")
    add("--augmentation", default="CustomAugmentation", choices=list(dataset.AUGMENTATIONS),
        help="; ".join(f"{k}: {v.help}" for k, v in dataset.AUGMENTATIONS.items()))
    add("--crop", default=None, choices=dataset.CROPS,
        help="crop before resizing (default: the augmentation's; face = detected face box)")
    add("--face_margin", type=float, default=0.4, help="face box expansion per side (--crop face)")
    add("--canny", action="store_true", help="add a Canny-edge channel through a learned 1x1 conv")
    add("--normalize", default="imagenet", choices=("imagenet", "dataset"),
        help="ImageNet mean/std, or the training images' own")
    add("--mixup", action="store_true", help="MixUp batches (soft targets)")
    add("--cutmix", action="store_true", help="CutMix batches (soft targets)")
    add("--mixup_alpha", type=float, default=0.2, help="MixUp Beta(alpha, alpha)")
    add("--cutmix_alpha", type=float, default=1.0, help="CutMix Beta(alpha, alpha)")
    add("--batch_size", type=int, default=64, help="training batch size")
    add("--valid_batch_size", type=int, default=1000, help="validation batch size")
    # model
    add("--model", default="BaseModel",
        help="BaseModel, a torchvision model (" + ", ".join(models.TORCHVISION_MODELS)
             + ") or any timm model name")
    add("--multi_head", action="store_true",
        help="one backbone, three heads (mask, gender, age); 18-class p = product of heads")
    add("--pretrained", action="store_true", help="timm hub weights (needs internet)")
    add("--weights", default=None, metavar="FILE",
        help="local pretrained state dict; heads of another size are re-initialised")
    add("--drop_rate", type=float, default=0.0, help="dropout before the classifier (timm models)")
    # loss
    add("--criterion", default="cross_entropy", choices=list(losses.LOSSES), help="loss")
    add("--smoothing", type=float, default=0.1, help="label_smoothing strength")
    add("--focal_gamma", type=float, default=2.0, help="focal loss gamma")
    add("--arc_scale", type=float, default=30.0, help="arcface logit scale")
    add("--arc_margin", type=float, default=0.5, help="arcface angular margin (radians)")
    # optimisation
    add("--optimizer", default="adam", choices=OPTIMIZERS, help="optimizer")
    add("--lr", type=float, default=1e-3, help="learning rate")
    add("--momentum", type=float, default=0.9, help="momentum (optimizer momentum)")
    add("--weight_decay", type=float, default=0.0, help="weight decay")
    add("--scheduler", default="steplr", choices=SCHEDULERS, help="learning-rate schedule")
    add("--lr_decay_step", type=int, default=20, help="steplr: epochs between decays")
    add("--gamma", type=float, default=0.5, help="steplr/exponentiallr/lambdalr decay factor")
    add("--tmax", type=int, default=None, help="cosineannealinglr period in epochs (default: --epochs)")
    add("--maxlr", type=float, default=None, help="cycliclr upper lr (default: 10 x --lr)")
    add("--mode", default="max", choices=("min", "max"),
        help="reducelronplateau: min watches val loss, max watches val F1")
    add("--factor", type=float, default=0.5, help="reducelronplateau factor")
    add("--patience", type=int, default=2, help="reducelronplateau patience (epochs)")
    add("--threshold", type=float, default=1e-4, help="reducelronplateau threshold")
    add("--warmup_epochs", type=int, default=0, help="linear lr warm-up epochs")
    add("--early_stopping_patience", type=int, default=5,
        help="stop after N epochs without a better val F1 (-1 or 0 = off)")
    # speed
    add("--amp", default="auto", choices=AMP_MODES, help="mixed precision (auto: bf16 on CUDA)")
    add("--channels_last", action="store_true", help="channels_last memory format")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--sync_bn", action="store_true", help="SyncBatchNorm across torchrun processes")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags; --config/--resume replay a saved config.json under the flags actually given."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    replay = args.config or (args.resume and str(Path(args.resume) / "config.json"))
    if not replay:
        return args
    saved = dataset.read_json_checked(replay)
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise UserError(f"{replay}: unknown setting(s) {', '.join(unknown)}")
    saved = {k: v for k, v in saved.items() if k not in ("config", "resume")}
    for action in parser._actions:
        if action.dest in saved:
            check_replayed(action, saved[action.dest], replay)
    parser.set_defaults(**saved)
    return parser.parse_args(argv)


def check_replayed(action: argparse.Action, value, source: str) -> None:
    """A setting of a saved config.json has the shape and type its flag would give (a hand-edited
    file skips argparse's conversion, so '"resize": 32' would fail deep inside training)."""
    names = {int: "an integer", float: "a number"}
    expected = names.get(action.type, "a string")
    if action.nargs == 0:  # store_true / store_false
        expected, fits = "true or false", isinstance(value, bool)
    elif isinstance(action.nargs, int):
        expected = f"a list of {action.nargs} values"
        fits = isinstance(value, list) and len(value) == action.nargs and all(
            action.type is None or isinstance(v, action.type) for v in value)
    elif value is None:
        fits = action.default is None or action.type is None
    elif action.type in (int, float):
        fits = isinstance(value, (int, float)) and not isinstance(value, bool) and (
            action.type is float or float(value).is_integer())
    else:
        fits = isinstance(value, str)
    if fits and value is not None and action.choices is not None and value not in action.choices:
        expected, fits = "one of " + ", ".join(map(str, action.choices)), False
    if not fits:
        raise UserError(f"{source}: setting '{action.dest}' is {json.dumps(value)}; "
                        f"expected {expected}")


# ----------------------------------------------------------------------------------------------
# Validation before any work
# ----------------------------------------------------------------------------------------------
# flag -> (is the value fine?, what was expected): checked before any data loads
LIMITS = {
    "epochs": (lambda v: v >= 1, "at least 1"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "valid_batch_size": (lambda v: v >= 1, "at least 1"),
    "lr": (lambda v: v >= 0, "a learning rate of 0 or more"),  # 0 freezes: a sanity check
    "momentum": (lambda v: 0 <= v < 1, "0 <= momentum < 1"),
    "weight_decay": (lambda v: v >= 0, "0 or more"),
    "gamma": (lambda v: v > 0, "a decay factor above 0"),
    "lr_decay_step": (lambda v: v >= 1, "at least 1 epoch"),
    "tmax": (lambda v: v is None or v >= 1, "at least 1 epoch"),
    "maxlr": (lambda v: v is None or v > 0, "a learning rate above 0"),
    "factor": (lambda v: 0 < v < 1, "0 < factor < 1"),
    "patience": (lambda v: v >= 0, "0 or more epochs"),
    "threshold": (lambda v: v >= 0, "0 or more"),
    "warmup_epochs": (lambda v: v >= 0, "0 or more epochs"),
    "early_stopping_patience": (lambda v: v >= -1, "-1 or 0 (off) or a number of epochs"),
    "log_interval": (lambda v: v >= 1, "at least 1 batch"),
    "num_workers": (lambda v: v >= 0, "0 (one per core) or more"),
    "seed": (lambda v: 0 <= v < 2 ** 32, "0 <= seed < 2**32"),
    "mixup_alpha": (lambda v: v > 0, "a Beta parameter above 0"),
    "cutmix_alpha": (lambda v: v > 0, "a Beta parameter above 0"),
    "smoothing": (lambda v: 0 <= v < 1, "0 <= smoothing < 1"),
    "focal_gamma": (lambda v: v >= 0, "0 or more"),
    "arc_scale": (lambda v: v > 0, "a scale above 0"),
    "arc_margin": (lambda v: 0 <= v < math.pi / 2, "0 <= margin < pi/2 radians"),
    "drop_rate": (lambda v: 0 <= v < 1, "0 <= rate < 1"),
    "face_margin": (lambda v: v >= 0, "0 or more (a fraction of the face box per side)"),
    "old_age": (lambda v: v > 30, "an age above 30 (30..old_age-1 is the middle group)"),
}


def check_args(args: argparse.Namespace) -> None:
    """Reject every bad name, number or combination before data loads."""
    for flag, (fine, expected) in LIMITS.items():
        if not fine(getattr(args, flag)):
            raise UserError(f"--{flag} {getattr(args, flag)}: expected {expected}")
    if args.name in ("", ".", "..") or Path(args.name).name != args.name or "\\" in args.name:
        raise UserError(f"--name '{args.name}': expected a plain folder name (no '/'); "
                        "use --model_dir for where run folders go")
    dataset.check_output_path(args.model_dir, "--model_dir", folder=True)
    dataset.check_output_path(args.cache_dir, "--cache_dir", folder=True)
    try:
        models.validate_model_name(args.model)
    except ValueError as why:
        raise UserError(f"--model: {why}") from None
    if args.multi_head and (args.category != "multi" or args.age_label_num != 3):
        raise UserError("--multi_head needs --category multi and --age_label_num 3")
    if args.criterion == "arcface" and args.multi_head:
        raise UserError("--criterion arcface works with single-head models; drop --multi_head")
    if not 0 <= args.val_ratio < 1:
        raise UserError(f"--val_ratio {args.val_ratio}: expected 0 <= ratio < 1")
    if args.kfold == 1 or args.kfold < 0:
        raise UserError(f"--kfold {args.kfold}: expected 0 (off) or at least 2")
    if args.fold is not None and not (args.kfold or args.folds):
        raise UserError(f"--fold {args.fold} needs --kfold K or --folds FILE")
    if min(args.resize) < 16:
        raise UserError(f"--resize {args.resize}: expected H W of at least 16 pixels")
    drop_range(args.drop_ages)
    for flag in ("relabel", "weights", "config", "folds"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            raise UserError(f"--{flag} {path}: file not found")
    if args.resume and not (Path(args.resume) / "config.json").is_file():
        raise UserError(f"--resume {args.resume}: not a run folder (no config.json there)")
    if args.resume:  # before its config.json is rewritten with this call's flags
        for last in [Path(args.resume) / "last.pth", *Path(args.resume).glob("fold*/last.pth")]:
            if last.is_file():
                load_checkpoint(last, mmap=True)
    if args.weights:
        models.read_state_dict(args.weights)
    resolve_device(args.device)


def drop_range(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        low, high = (int(v) for v in text.split("-"))
    except ValueError:
        raise UserError(f"--drop_ages '{text}': expected LO-HI, e.g. 57-59") from None
    if low > high:
        raise UserError(f"--drop_ages '{text}': expected LO <= HI, e.g. 57-59")
    return low, high


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device '{name}': expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --amp, or None for full precision."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "fp16":
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        if mode == "bf16":
            raise UserError("--amp bf16: this GPU does not support bfloat16; use --amp fp16")
        return torch.float16
    return torch.bfloat16


# ----------------------------------------------------------------------------------------------
# Run folders and atomic files
# ----------------------------------------------------------------------------------------------
def new_run_dir(model_dir: str | Path, name: str) -> Path:
    """{model_dir}/{name}, else {name}2, {name}3, ... (created, so parallel runs never share one).
    The number is appended to the whole name, so dotted names like 'lr1e-3.v2' number right."""
    root = Path(model_dir)
    root.mkdir(parents=True, exist_ok=True)
    number = 1
    while True:
        candidate = root / (name if number == 1 else f"{name}{number}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            number += 1


def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save to a temp file then os.replace: a kill mid-save leaves the old file intact."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    dataset.atomic_write_bytes(path, buffer.getvalue())


def write_summary(path: Path, rows: list[dict]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    dataset.atomic_write_text(path, out.getvalue())


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Optimiser and schedule
# ----------------------------------------------------------------------------------------------
def build_optimizer(args: argparse.Namespace, params, device: torch.device) -> torch.optim.Optimizer:
    # fused kernels on CUDA: one launch for all parameters instead of one per tensor
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if args.optimizer in ("sgd", "momentum"):
        momentum = args.momentum if args.optimizer == "momentum" else 0.0
        return torch.optim.SGD(params, lr=args.lr, momentum=momentum,
                               weight_decay=args.weight_decay, **fast)
    if args.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=args.lr, weight_decay=args.weight_decay, foreach=True)
    optimizer = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return optimizer(params, lr=args.lr, weight_decay=args.weight_decay, **fast)


def build_scheduler(args: argparse.Namespace, optimizer, steps_per_epoch: int):
    """Returns (scheduler, steps per batch?). Epoch schedulers step after each epoch."""
    s = torch.optim.lr_scheduler
    if args.scheduler == "steplr":
        return s.StepLR(optimizer, step_size=args.lr_decay_step, gamma=args.gamma), False
    if args.scheduler == "lambdalr":
        gamma = args.gamma
        return s.LambdaLR(optimizer, lr_lambda=lambda epoch: gamma ** epoch), False
    if args.scheduler == "exponentiallr":
        return s.ExponentialLR(optimizer, gamma=args.gamma), False
    if args.scheduler == "cosineannealinglr":
        return s.CosineAnnealingLR(optimizer, T_max=args.tmax or args.epochs), False
    if args.scheduler == "reducelronplateau":
        return s.ReduceLROnPlateau(optimizer, mode=args.mode, factor=args.factor,
                                   patience=args.patience, threshold=args.threshold), False
    # cycliclr: one triangle every 2 epochs, stepping per batch
    max_lr = args.maxlr or args.lr * 10
    return s.CyclicLR(optimizer, base_lr=args.lr, max_lr=max_lr, step_size_up=steps_per_epoch,
                      cycle_momentum=False), True


# ----------------------------------------------------------------------------------------------
# One epoch of training, one pass of evaluation
# ----------------------------------------------------------------------------------------------
class NonFiniteLoss(UserError):
    pass


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer, batches, augment: nn.Module,
                    *, mixer=None, scaler=None, autocast_dtype=None, batch_scheduler=None,
                    warmup: tuple[int, int] | None = None, epoch: int = 0, log_interval: int = 20,
                    writer=None, channels_last: bool = False, progress: bool = True) -> dict:
    """One pass over ``batches``; returns {'loss', 'images', 'seconds', 'images_per_s'}."""
    model.train()
    augment.train()
    device = next(model.parameters()).device
    total_loss = torch.zeros((), device=device)
    seen, started = 0, time.perf_counter()
    base_lrs = [group["initial_lr"] if "initial_lr" in group else group["lr"]
                for group in optimizer.param_groups]
    # disable=None hides the bar when stderr is not a terminal (logs, CI)
    bar = tqdm(batches, desc=f"epoch {epoch + 1}", leave=False, disable=None if progress else True)
    for step, (images, targets, _) in enumerate(bar):
        if warmup is not None:  # linear warm-up over the first warmup epochs, per batch
            done, total = warmup[0] + step + 1, warmup[1]
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * min(1.0, done / total)
        inputs = augment(images)
        if mixer is not None:
            inputs, targets = mixer(inputs, targets)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(inputs)
            batch_loss = criterion(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(batch_loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            batch_loss.backward()
            optimizer.step()
        if batch_scheduler is not None:
            batch_scheduler.step()
        total_loss += batch_loss.detach() * len(images)
        seen += len(images)
        # checking on the host waits for the device, so CUDA checks only every log_interval
        if device.type != "cuda" or (step + 1) % log_interval == 0:
            value = batch_loss.item()
            if not math.isfinite(value):
                raise NonFiniteLoss(
                    f"loss is {value} at epoch {epoch + 1}, batch {step + 1} "
                    f"(lr {optimizer.param_groups[0]['lr']:.3g}); stopped, the checkpoints of "
                    "earlier epochs (if any) are kept; try a lower --lr or --amp off")
            bar.set_postfix(loss=f"{value:.4f}")
            if writer is not None and (step + 1) % log_interval == 0:
                writer.add_scalar("Loss/train_batch", value, epoch * len(batches) + step)
    mean_loss = (total_loss / max(seen, 1)).item()
    if not math.isfinite(mean_loss):
        raise NonFiniteLoss(f"loss is {mean_loss} in epoch {epoch + 1} "
                            f"(lr {optimizer.param_groups[0]['lr']:.3g}); the checkpoints of "
                            "earlier epochs (if any) are kept")
    seconds = time.perf_counter() - started
    return {"loss": mean_loss, "images": seen, "seconds": seconds,
            "images_per_s": seen / max(seconds, 1e-9)}


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


def score(probs: np.ndarray, true_labels: np.ndarray, category: str) -> dict:
    """Macro F1 (sklearn, the competition's metric), accuracy and, for 18 classes, per-head F1."""
    truth = dataset.category_target(true_labels, category)
    predicted = probs.argmax(1)
    metrics = {"f1": f1_score(truth, predicted, average="macro"),
               "acc": float((truth == predicted).mean())}
    if category == "multi":
        for head, t, p in zip(("mask", "gender", "age"), dataset.decode_class(truth),
                              dataset.decode_class(predicted)):
            metrics[f"f1_{head}"] = f1_score(t, p, average="macro")
    return metrics


def evaluate(model: nn.Module, batches, augment: nn.Module, true_labels: np.ndarray, *,
             category: str, age_label_num: int = 3, criterion=None, autocast_dtype=None,
             channels_last: bool = False) -> dict:
    """Val loss, macro F1, accuracy, per-head F1, plus 'probs' and 'predictions'."""
    probs, val_loss = predict_probabilities(
        model, batches, augment, category=category, age_label_num=age_label_num,
        autocast_dtype=autocast_dtype, channels_last=channels_last, criterion=criterion)
    metrics = score(probs, true_labels, category)
    return {"loss": val_loss, **metrics, "probs": probs, "predictions": probs.argmax(1),
            "truth": dataset.category_target(true_labels, category)}


# ----------------------------------------------------------------------------------------------
# TensorBoard figures
# ----------------------------------------------------------------------------------------------
def confusion_figure(truth: np.ndarray, predicted: np.ndarray, n_classes: int):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    matrix = confusion_matrix(truth, predicted, labels=list(range(n_classes)))
    figure, axes = plt.subplots(figsize=(6, 6))
    axes.imshow(matrix, cmap="Blues")
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            axes.text(j, i, str(count), ha="center", va="center", fontsize=6)
    return figure


def prediction_grid_figure(images: np.ndarray, truth: np.ndarray, predicted: np.ndarray):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(images)
    cols = min(n, 8)
    rows = math.ceil(n / cols)
    figure, grid = plt.subplots(rows, cols, figsize=(cols * 1.5, rows * 2), squeeze=False)
    for axes, image, t, p in zip(grid.flat, images, truth, predicted):
        axes.imshow(image[..., :3])
        axes.set_title(f"{t}->{p}", fontsize=8, color="green" if t == p else "red")
    for axes in grid.flat:
        axes.axis("off")
    return figure


# ----------------------------------------------------------------------------------------------
# Data for a run: records, splits, the cache
# ----------------------------------------------------------------------------------------------
def load_records(args: argparse.Namespace, say=print):
    data_dir = dataset.resolve_train_dir(args.data_dir, say=say)
    frame = dataset.parse_train_dir(data_dir, relabel=args.relabel, warn=say)
    return data_dir, dataset.add_labels(frame, old_age=args.old_age)


def preprocess_of(args: argparse.Namespace) -> dataset.Preprocess:
    crop = args.crop or dataset.AUGMENTATIONS[args.augmentation].crop
    return dataset.Preprocess(resize=tuple(args.resize), crop=crop, canny=args.canny,
                              face_margin=args.face_margin)


def build_image_cache(args: argparse.Namespace, frame, preprocess: dataset.Preprocess, say=print):
    """The decode-once cache for every training photo (and the face boxes when cropping faces)."""
    boxes, face_info = None, {}
    if preprocess.crop == "face":
        import face
        boxes, face_info = face.crop_boxes_for_training(frame, preprocess, args.cache_dir, say=say)
    images = dataset.build_cache(frame["path"].tolist(), preprocess, args.cache_dir, boxes=boxes,
                                 threads=args.num_workers or None)
    return images, face_info


def train_rows_after_policies(args: argparse.Namespace, frame, train_rows: np.ndarray) -> np.ndarray:
    """Drop borderline ages (train only), then oversample people (train only)."""
    dropped = drop_range(args.drop_ages)
    if dropped:
        ages = frame["age"].to_numpy()[train_rows]
        train_rows = train_rows[(ages < dropped[0]) | (ages > dropped[1])]
        if not len(train_rows):
            raise UserError(f"--drop_ages {args.drop_ages} leaves no training photo")
    return dataset.balance_people(frame, train_rows, args.data_balancing, args.seed)


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


def process_device(args: argparse.Namespace, procs: Processes) -> torch.device:
    device = resolve_device(args.device)
    if procs.distributed and device.type == "cuda":
        return torch.device("cuda", procs.local_rank)
    return device


# ----------------------------------------------------------------------------------------------
# One model: train on train_rows, select on val_rows, write the run folder
# ----------------------------------------------------------------------------------------------
def build_network(args: argparse.Namespace, n_out: int, device: torch.device,
                  procs: Processes) -> tuple[nn.Module, nn.Module]:
    """(the plain model, what the loop calls: DDP- and/or torch.compile-wrapped)."""
    net = models.build_model(args.model, n_out, multi_head=args.multi_head, canny=args.canny,
                             cosine_head=args.criterion == "arcface", cosine_scale=args.arc_scale,
                             pretrained=args.pretrained, weights=args.weights,
                             drop_rate=args.drop_rate)
    if args.sync_bn and procs.distributed and device.type != "cuda":
        say(procs, "--sync_bn: SyncBatchNorm runs on CUDA only; ignored on CPU")
    elif args.sync_bn and procs.distributed:
        config = net.model_config
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net.model_config = config
    net.to(device)
    if args.channels_last:
        net.to(memory_format=torch.channels_last)
    runner = net
    if procs.distributed:
        runner = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        runner = torch.compile(runner)
    runner.model_config = net.model_config
    return net, runner


def training_batches(args: argparse.Namespace, frame, images: np.ndarray, train_rows: np.ndarray,
                     val_rows: np.ndarray, n_out: int, device: torch.device, procs: Processes):
    targets = dataset.training_targets(frame, "multi" if args.multi_head else args.category,
                                       args.age_label_num, args.old_age)
    weights = sampler = None
    if args.weightsampler:
        if procs.distributed:
            raise UserError("--weightsampler is not supported with several processes; "
                            "use --data_balancing instead")
        counts = np.bincount(targets[train_rows], minlength=n_out).astype(float)
        weights = 1.0 / counts[targets[train_rows]]
    if procs.distributed:
        from torch.utils.data import DistributedSampler
        sampler = DistributedSampler(range(len(train_rows)), num_replicas=procs.world,
                                     rank=procs.rank, shuffle=True, seed=args.seed)
    train_batches = dataset.CachedBatches(images, targets[train_rows], train_rows, args.batch_size,
                                          device, shuffle=True, weights=weights, sampler=sampler)
    # each process scores its share of val; the shares are gathered back in order
    mine = np.arange(procs.rank, len(val_rows), procs.world)
    val_batches = dataset.CachedBatches(images, targets[val_rows][mine], val_rows[mine],
                                        args.valid_batch_size, device)
    return train_batches, val_batches, mine


def evaluate_shared(runner: nn.Module, val_batches, augment, true_val: np.ndarray, mine: np.ndarray,
                    args: argparse.Namespace, criterion, autocast_dtype, procs: Processes) -> dict:
    """evaluate() on every process's share of val, gathered so all ranks see the same metrics."""
    module = runner.module if isinstance(runner, nn.parallel.DistributedDataParallel) else runner
    probs, loss_sum = predict_probabilities(
        module, val_batches, augment, category=args.category, age_label_num=args.age_label_num,
        autocast_dtype=autocast_dtype, channels_last=args.channels_last, criterion=criterion)
    parts = procs.gather((mine, probs, loss_sum * len(mine)))
    all_probs = np.zeros((len(true_val), probs.shape[1]))
    for positions, part, _ in parts:
        all_probs[positions] = part
    val_loss = sum(p[2] for p in parts) / max(len(true_val), 1)
    metrics = score(all_probs, true_val, args.category)
    return {"loss": val_loss, **metrics, "probs": all_probs, "predictions": all_probs.argmax(1),
            "truth": dataset.category_target(true_val, args.category)}


def fit(args: argparse.Namespace, frame, images: np.ndarray, train_rows: np.ndarray,
        val_rows: np.ndarray, run_dir: Path, *, preprocess: dataset.Preprocess, mean, std,
        extra: dict | None = None, procs: Processes = Processes()) -> dict:
    """Train one model; rank 0 writes best.pth, last.pth, summary.csv and TensorBoard events."""
    device = process_device(args, procs)
    seed_everything(args.seed)
    n_out = dataset.num_outputs(args.category, args.age_label_num)
    net, runner = build_network(args, n_out, device, procs)
    criterion = losses.build_loss(
        args.criterion, 18 if args.multi_head else n_out, multi_head=args.multi_head,
        smoothing=args.smoothing, gamma=args.focal_gamma, scale=args.arc_scale,
        margin=args.arc_margin).to(device)
    augment = dataset.build_augmentation(args.augmentation, mean, std, preprocess.channels).to(device)
    train_batches, val_batches, mine = training_batches(args, frame, images, train_rows, val_rows,
                                                        n_out, device, procs)
    true_val = frame["label"].to_numpy()[val_rows]
    optimizer = build_optimizer(args, net.parameters(), device)
    scheduler, per_batch = build_scheduler(args, optimizer, len(train_batches))
    autocast_dtype = amp_dtype(args.amp, device)
    scaler = torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 else None
    mixer = dataset.build_mixer(18 if args.multi_head else n_out, args.mixup, args.cutmix,
                                args.mixup_alpha, args.cutmix_alpha)
    if procs.distributed:  # different augmentation draws per process, same model init
        torch.manual_seed(args.seed * 1000 + procs.rank)

    state = {"epoch": 0, "best_f1": -1.0, "best_epoch": 0, "stale_epochs": 0, "summary": []}
    last_path, best_path = run_dir / "last.pth", run_dir / "best.pth"
    if last_path.is_file():  # resuming: restore everything that shapes the next epochs
        saved = load_checkpoint(last_path)
        net.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        state = saved["train_state"]
        if not procs.distributed:
            set_rng_state(saved["rng"])
        say(procs, f"resume: {run_dir} from epoch {state['epoch']} (best F1 {state['best_f1']:.4f})")

    record = {"model_config": net.model_config, "preprocess": preprocess.to_dict(),
              "normalize": {"mean": list(mean), "std": list(std)}, "category": args.category,
              "age_label_num": args.age_label_num, "augmentation": args.augmentation,
              "config": vars(args), **(extra or {})}
    writer = None
    if procs.main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(run_dir))
    patience = max(args.early_stopping_patience, 0)
    steps = len(train_batches)
    try:
        for epoch in range(state["epoch"], args.epochs):
            if train_batches.sampler is not None:
                train_batches.sampler.set_epoch(epoch)
            warming = epoch < args.warmup_epochs
            train = train_one_epoch(
                runner, criterion, optimizer, train_batches, augment, mixer=mixer, scaler=scaler,
                autocast_dtype=autocast_dtype,
                batch_scheduler=scheduler if per_batch and not warming else None,
                warmup=(epoch * steps, args.warmup_epochs * steps) if warming else None,
                epoch=epoch, log_interval=args.log_interval, writer=writer,
                channels_last=args.channels_last, progress=procs.main)
            train = gather_train_metrics(train, procs)
            if len(val_rows):
                val = evaluate_shared(runner, val_batches, augment, true_val, mine, args, criterion,
                                      autocast_dtype, procs)
            else:
                val = {"loss": float("nan"), "f1": float("nan"), "acc": float("nan")}
            lr = optimizer.param_groups[0]["lr"]
            if not per_batch and not warming:
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(val["loss"] if args.mode == "min" else val["f1"])
                else:
                    scheduler.step()
            row = {"epoch": epoch + 1, "train_loss": train["loss"], "val_loss": val["loss"],
                   "val_f1": val["f1"], "val_acc": val["acc"], "f1_mask": val.get("f1_mask", ""),
                   "f1_gender": val.get("f1_gender", ""), "f1_age": val.get("f1_age", ""),
                   "lr": lr, "seconds": round(train["seconds"], 2),
                   "images_per_s": round(train["images_per_s"], 1)}
            state["summary"].append(row)
            state["epoch"] = epoch + 1
            improved = not len(val_rows) or val["f1"] > state["best_f1"]
            if improved:
                state.update(best_f1=val["f1"], best_epoch=epoch + 1, stale_epochs=0)
            else:
                state["stale_epochs"] += 1
            if procs.main:
                log_epoch(writer, row, val, images, val_rows, dataset.CATEGORY_CLASSES[args.category])
                if improved:
                    save_checkpoint({**record, "model": net.state_dict(), "epoch": epoch + 1,
                                     "metrics": strip_arrays(val)}, best_path)
                save_checkpoint({**record, "model": net.state_dict(),
                                 "optimizer": optimizer.state_dict(),
                                 "scheduler": scheduler.state_dict(),
                                 "scaler": scaler.state_dict() if scaler is not None else None,
                                 "train_state": state, "rng": rng_state(), "epoch": epoch + 1},
                                last_path)
                write_summary(run_dir / "summary.csv", state["summary"])
                print(f"epoch {epoch + 1}/{args.epochs}: train loss {train['loss']:.4f}, "
                      f"val loss {val['loss']:.4f}, val F1 {val['f1']:.4f}, acc {val['acc']:.4f}, "
                      f"lr {lr:.3g}, {train['images_per_s']:.0f} img/s" + (" *" if improved else ""),
                      flush=True)
            procs.barrier()
            if patience and state["stale_epochs"] >= patience:
                say(procs, f"EarlyStopping: no better val F1 for {patience} epochs; stopping at "
                           f"epoch {epoch + 1} (set --early_stopping_patience 0 to turn it off)")
                break
    finally:
        if writer is not None:
            writer.close()
    say(procs, f"best: epoch {state['best_epoch']}, val F1 {state['best_f1']:.4f} -> {best_path}")
    return {"best_f1": state["best_f1"], "best_epoch": state["best_epoch"],
            "summary": state["summary"]}


def gather_train_metrics(train: dict, procs: Processes) -> dict:
    """Loss averaged over all processes' images; images/s summed (they run side by side)."""
    parts = procs.gather(train)
    images = sum(p["images"] for p in parts)
    seconds = max(p["seconds"] for p in parts)
    return {"loss": sum(p["loss"] * p["images"] for p in parts) / max(images, 1),
            "images": images, "seconds": seconds, "images_per_s": images / max(seconds, 1e-9)}


def say(procs: Processes, message: str) -> None:
    if procs.main:
        print(message, flush=True)


def strip_arrays(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not isinstance(v, np.ndarray)}


def load_checkpoint(path: Path, mmap: bool = False) -> dict:
    """A train.py checkpoint; ``mmap`` only maps it (a cheap check that it is whole)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as why:  # a torn or foreign file: name it instead of a traceback
        raise UserError(f"{path}: not a readable checkpoint ({type(why).__name__}); expected a "
                        "whole file written by train.py") from None


def log_epoch(writer, row: dict, val: dict, images: np.ndarray, val_rows: np.ndarray,
              n_classes: int) -> None:
    step = row["epoch"]
    writer.add_scalar("Loss/train", row["train_loss"], step)
    writer.add_scalar("LR", row["lr"], step)
    if not len(val_rows):
        return
    writer.add_scalar("Loss/val", row["val_loss"], step)
    writer.add_scalar("F1/val", row["val_f1"], step)
    writer.add_scalar("Acc/val", row["val_acc"], step)
    for head in ("mask", "gender", "age"):
        if row[f"f1_{head}"] != "":
            writer.add_scalar(f"F1/{head}", row[f"f1_{head}"], step)
    import matplotlib.pyplot as plt
    truth = val["truth"]
    figure = confusion_figure(truth, val["predictions"], n_classes)
    writer.add_figure("Confusion/val", figure, step)
    shown = slice(0, min(16, len(val_rows)))
    figure = prediction_grid_figure(np.asarray(images[val_rows[shown]]), truth[shown],
                                    val["predictions"][shown])
    writer.add_figure("Predictions/val", figure, step)
    plt.close("all")


# ----------------------------------------------------------------------------------------------
# main: one split, or k folds with out-of-fold predictions
# ----------------------------------------------------------------------------------------------
def normalization(args: argparse.Namespace, images: np.ndarray, train_rows: np.ndarray):
    if args.normalize == "imagenet":
        return list(dataset.IMAGENET_MEAN), list(dataset.IMAGENET_STD)
    return dataset.dataset_statistics(images[np.sort(np.unique(train_rows))], seed=args.seed)


def main(args: argparse.Namespace) -> dict:
    """Train as ``args`` says; returns {'run_dir', 'best_f1', ...}. Knows nothing of argparse."""
    check_args(args)
    dataset.tune_host_allocator()
    procs = start_processes(args.device)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest
    data_dir, frame = load_records(args, say=lambda m: say(procs, m))
    args.data_dir = str(data_dir)  # recorded resolved, so --config/--resume find the same data
    # split or folds decided (and checked) before any photo is decoded or folder written
    if args.kfold or args.folds:
        fold_plan = checked_folds(args, frame, warn=lambda m: say(procs, m))
    else:
        split = dataset.DATASETS[args.dataset].split
        train_rows, val_rows = split(frame, args.val_ratio, args.seed)
        train_rows = train_rows_after_policies(args, frame, train_rows)
    preprocess = preprocess_of(args)
    if not procs.main:  # rank 0 decodes into the cache; the others then read it
        procs.barrier()
    images, face_info = build_image_cache(args, frame, preprocess, say=lambda m: say(procs, m))
    if procs.main:
        procs.barrier()
        run_dir = prepare_run_dir(args)
    run_dir = Path(procs.broadcast(str(run_dir) if procs.main else None))
    say(procs, f"run: {run_dir} | {frame['profile'].nunique()} people, {len(frame)} photos | "
               f"{args.model} {args.category} {preprocess.resize[0]}x{preprocess.resize[1]} crop "
               f"{preprocess.crop} | {process_device(args, procs)} x {procs.world} process(es)")
    try:
        if args.kfold or args.folds:
            return run_kfold(args, frame, fold_plan, images, run_dir, preprocess, face_info,
                             procs)
        mean, std = normalization(args, images, train_rows)
        say(procs, f"split: {len(np.unique(train_rows))} train photos ({len(train_rows)} with "
                   f"repeats), {len(val_rows)} val photos")
        result = fit(args, frame, images, train_rows, val_rows, run_dir, preprocess=preprocess,
                     mean=mean, std=std, extra={"face": face_info}, procs=procs)
    except UserError:
        if procs.main and not args.resume and args.fold is None:
            remove_if_no_checkpoint(run_dir)
        raise
    return {"run_dir": run_dir, **result}


def remove_if_no_checkpoint(run_dir: Path) -> None:
    """A new run that failed before its first checkpoint (no weights offline, a loss that blew up
    at once) leaves no folder behind: it would only hold a config and an empty log."""
    if not any(run_dir.rglob("*.pth")):
        shutil.rmtree(run_dir, ignore_errors=True)


def prepare_run_dir(args: argparse.Namespace) -> Path:
    """The run folder, with config.json written: --resume's, {name} itself when one fold of a
    shared k-fold run is trained (--fold), else a new {name}, {name}2, ..."""
    if args.resume:
        run_dir = Path(args.resume)
    elif args.fold is not None:
        run_dir = Path(args.model_dir) / args.name
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        run_dir = new_run_dir(args.model_dir, args.name)
    saved = {k: v for k, v in vars(args).items() if k not in ("resume", "config", "fold")}
    dataset.atomic_write_text(run_dir / "config.json", json.dumps(saved, indent=2))
    return run_dir


def fold_assignments(args: argparse.Namespace, frame: pd.DataFrame, warn=print) -> pd.Series:
    """Fold per profile: from --folds FILE (checked against the data), else StratifiedGroupKFold."""
    if not args.folds:
        return dataset.kfold_assignments(frame, args.kfold, args.seed, args.category, warn=warn)
    table = dataset.read_csv_checked(args.folds, ["profile", "fold"])
    folds = table.set_index("profile")["fold"]
    missing = sorted(set(frame["profile"]) - set(folds.index))
    if missing:
        raise UserError(f"{args.folds}: {len(missing)} profile(s) of the data have no fold "
                        f"(first: {missing[0]})")
    n_folds = folds.nunique()
    if args.kfold and args.kfold != n_folds:
        raise UserError(f"{args.folds} has {n_folds} folds but --kfold is {args.kfold}")
    if sorted(folds.unique()) != list(range(n_folds)):
        raise UserError(f"{args.folds}: folds must be numbered 0..{n_folds - 1}")
    args.kfold = n_folds
    return folds.loc[sorted(set(frame["profile"]))]


@dataclass(frozen=True)
class FoldPlan:
    """Who validates where in a k-fold run, decided once before any photo is decoded."""
    folds: pd.Series             # profile -> fold, as folds.csv
    fold_of_row: np.ndarray      # fold of every photo (row of the frame)
    rows: list[tuple[np.ndarray, np.ndarray]]  # per fold: (train rows after policies, val rows)


def checked_folds(args: argparse.Namespace, frame: pd.DataFrame, warn=print) -> FoldPlan:
    """fold_assignments and every fold's rows, with --fold and each fold's training photos
    checked."""
    folds = fold_assignments(args, frame, warn)
    if args.fold is not None and not 0 <= args.fold < args.kfold:
        raise UserError(f"--fold {args.fold}: expected 0..{args.kfold - 1}")
    fold_of_row = frame["profile"].map(folds).to_numpy()
    rows = [(train_rows_after_policies(args, frame, np.flatnonzero(fold_of_row != fold)),
             np.flatnonzero(fold_of_row == fold)) for fold in range(args.kfold)]
    return FoldPlan(folds, fold_of_row, rows)


def run_kfold(args: argparse.Namespace, frame, plan: FoldPlan, images: np.ndarray,
              run_dir: Path, preprocess: dataset.Preprocess, face_info: dict,
              procs: Processes) -> dict:
    """Train K fold models in run_dir/fold{k} (fresh model, optimizer, schedule and early stopping
    each, on ``plan``'s rows); finished folds are skipped on --resume. Writes folds.csv and, once
    every fold is done, oof.csv: every photo scored by the fold model that never saw it."""
    if procs.main:
        dataset.atomic_write_text(run_dir / "folds.csv", plan.folds.to_frame("fold").to_csv())
    results = {}
    for fold in range(args.kfold) if args.fold is None else [args.fold]:
        fold_dir = run_dir / f"fold{fold}"
        done = fold_dir / "done.json"
        if done.is_file():
            say(procs, f"fold {fold}: finished earlier, skipped")
            continue
        fold_dir.mkdir(exist_ok=True)
        train_rows, val_rows = plan.rows[fold]
        mean, std = normalization(args, images, train_rows)
        say(procs, f"fold {fold}/{args.kfold}: {len(val_rows)} val photos")
        result = fit(args, frame, images, train_rows, val_rows, fold_dir, preprocess=preprocess,
                     mean=mean, std=std, extra={"face": face_info, "fold": fold}, procs=procs)
        results[fold] = {"best_f1": result["best_f1"], "best_epoch": result["best_epoch"]}
        if procs.main:
            dataset.atomic_write_text(done, json.dumps(results[fold]))
        procs.barrier()
    pending = [k for k in range(args.kfold) if not (run_dir / f"fold{k}" / "done.json").is_file()]
    if pending:
        say(procs, f"folds {pending} still to train; oof.csv is written when all are done "
                   f"(train them with --fold, then run once more with --resume {run_dir})")
        return {"run_dir": run_dir, "best_f1": float("nan"), "folds": results}
    metrics = write_out_of_fold(args, frame, images, run_dir, plan.fold_of_row, procs) \
        if procs.main else {}
    metrics = procs.broadcast(metrics)
    return {"run_dir": run_dir, "best_f1": metrics["f1"], "oof": metrics, "folds": results}


def write_out_of_fold(args: argparse.Namespace, frame, images: np.ndarray, run_dir: Path,
                      fold_of_row: np.ndarray, procs: Processes) -> dict:
    oof = np.zeros((len(frame), dataset.CATEGORY_CLASSES[args.category]))
    for fold in range(args.kfold):
        rows = np.flatnonzero(fold_of_row == fold)
        oof[rows] = fold_probabilities(args, run_dir / f"fold{fold}" / "best.pth", images, rows, procs)
    labels = frame["label"].to_numpy()
    metrics = score(oof, labels, args.category)
    table = pd.DataFrame({"path": frame["path"], "profile": frame["profile"], "fold": fold_of_row,
                          "label": dataset.category_target(labels, args.category)})
    probs = pd.DataFrame(oof, columns=[f"p{c}" for c in range(oof.shape[1])])
    dataset.atomic_write_text(run_dir / "oof.csv",
                              pd.concat([table, probs], axis=1).to_csv(index=False))
    dataset.atomic_write_text(run_dir / "oof_metrics.json", json.dumps(metrics, indent=2))
    heads = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("f1_"))
    print(f"out-of-fold: macro F1 {metrics['f1']:.4f}, acc {metrics['acc']:.4f}"
          + (f" ({heads})" if heads else "") + f" -> {run_dir / 'oof.csv'}")
    return metrics


def fold_probabilities(args: argparse.Namespace, checkpoint_path: Path, images: np.ndarray,
                       rows: np.ndarray, procs: Processes = Processes()) -> np.ndarray:
    """Scored-space probabilities of ``rows`` from a fold's best checkpoint."""
    device = process_device(args, procs)
    checkpoint = load_checkpoint(checkpoint_path)
    net = models.restore_model(checkpoint).to(device)
    normalize = checkpoint["normalize"]
    channels = dataset.Preprocess.from_dict(checkpoint["preprocess"]).channels
    augment = dataset.build_augmentation(checkpoint["augmentation"], normalize["mean"],
                                         normalize["std"], channels).to(device)
    batches = dataset.CachedBatches(images, np.zeros(len(rows), dtype=int), rows,
                                    args.valid_batch_size, device)
    probs, _ = predict_probabilities(net, batches, augment, category=checkpoint["category"],
                                     age_label_num=checkpoint["age_label_num"],
                                     autocast_dtype=amp_dtype(args.amp, device))
    return probs


if __name__ == "__main__":
    sys.exit(dataset.run_cli(main, parse_args))
