"""A run's settings, resolved once: train.py's flags (config.py) checked against the registries
and files they name, with what they leave open decided: the input size, normalisation and
resizing a model brings (--resize, --normalize auto, --interpolation auto), the per-image pipeline
(loaded and tried once), the precision (--amp, --channels_last) and the cache's preprocessing.
Everything downstream (the data, the trainer, the run folder, the benchmark) reads one frozen
Settings; config.json records its flags.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable

from maskface import (
    augmentation,
    config,
    distributed,
    image_cache,
    labels,
    mixed_precision,
    model as models,
    pipelines,
    run_folder,
)
from maskface.checkpoint import load_checkpoint
from maskface.cli import UserError


class Settings:
    """Every flag of a run as resolved (what config.json records), read as attributes
    (``settings.lr``), with what they resolve to: ``preprocess`` (what the image cache holds),
    ``pipeline`` (the per-image augmentation, None for presets without one) and ``precision``.
    Frozen: ``replace`` makes another (the data folder and fold count found later, a benchmark's
    variants)."""

    __slots__ = ("_flags", "preprocess", "pipeline", "precision")

    def __init__(self, flags: dict, preprocess: image_cache.Preprocess,
                 pipeline: pipelines.Pipeline | None,
                 precision: mixed_precision.Precision) -> None:
        for name, value in (("_flags", MappingProxyType(dict(flags))), ("preprocess", preprocess),
                            ("pipeline", pipeline), ("precision", precision)):
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._flags[name]
        except KeyError:
            raise AttributeError(f"no setting {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"settings are resolved once; {name} cannot change (use replace)")

    def __reduce__(self):  # for the processes of benchmark.py --side_by_side
        return Settings, (dict(self._flags), self.preprocess, self.pipeline, self.precision)

    @property
    def flags(self) -> dict:
        """Every flag's resolved value (a copy)."""
        return dict(self._flags)

    def record(self) -> dict:
        """What config.json holds: every flag but those that only say how one call runs."""
        return {k: v for k, v in self._flags.items() if k not in config.NOT_SAVED}

    def replace(self, **changes: Any) -> Settings:
        """The same settings with ``changes``; the precision is decided anew when --amp,
        --channels_last or --device change, as it would have been for them."""
        flags = {**self._flags, **changes}
        precision = self.precision
        if {"amp", "channels_last", "device"} & set(changes):
            precision = mixed_precision.choose_precision(
                flags["amp"], flags["channels_last"], distributed.resolve_device(flags["device"]),
                flags["model"])
        return Settings(flags, self.preprocess, self.pipeline, precision)


def resolve_settings(args: argparse.Namespace, say: Callable[[str], None] = print) -> Settings:
    """``args`` (config.parse_args) checked and resolved, before any photo is decoded: the flags'
    limits, the model's name and input size, the files they name, the device, the pipeline (loaded,
    hashed and run on dummy images of the cached size) and the precision."""
    config.check_flags(args)
    check_model(args)
    # --resume: each last.pth read once (mapped, not loaded) for what the settings need of it
    lasts = {path: load_checkpoint(path, mmap=True)
             for path in run_folder.last_checkpoints(Path(args.resume))} if args.resume else {}
    check_resume_checkpoints(args, lasts)
    if args.weights:
        models.read_state_dict(args.weights)
    if args.pretrained:  # the weights' file or their download, before any photo is decoded
        models.check_pretrained(args.model)
    device = distributed.resolve_device(args.device)
    resolved = model_defaults(args)
    say_model_defaults(args, resolved, say)
    flags = {**vars(args), **resolved}
    preprocess = preprocess_of(flags)
    if not args.resume:
        # config.json names the crop actually used, not null for "the augmentation's": a replay
        # crops as the run did (a resumed run keeps what it recorded, which its checkpoints hold)
        flags["crop"] = preprocess.crop
    pipeline = pipelines.checked_pipeline(args.augmentation, preprocess, args.augmentation_sha256)
    precision = run_precision(args, device, next(iter(lasts.values()), None))
    flags.update(model=models.resolved_model_value(args.model), amp=precision.amp,
                 channels_last="on" if precision.channels_last else "off",
                 # the pipeline's file, absolute, and its hash: a replay uses the same one or refuses
                 augmentation=pipelines.resolved_value(args.augmentation),
                 augmentation_sha256=pipeline and pipeline.sha256)
    return Settings(flags, preprocess, pipeline, precision)


def check_model(args: argparse.Namespace) -> None:
    """The model's name, and what it allows: its input size, --normalize model, --layer_decay."""
    try:
        models.validate_model_name(args.model)
    except ValueError as why:
        raise UserError(f"--model: {why}") from None
    fixed = models.fixed_input_size(args.model)
    if fixed is not None and args.resize is not None and tuple(args.resize) != fixed:
        raise UserError(f"--resize {args.resize[0]} {args.resize[1]}: {args.model} takes only "
                        f"{fixed[0]}x{fixed[1]} inputs; pass --resize {fixed[0]} {fixed[1]}")
    if args.normalize == "model" and not models.timm_pretrained_cfg(args.model):
        raise UserError(f"--normalize model: {args.model} has no timm pretrained_cfg with a "
                        "mean/std; use --normalize imagenet or dataset")
    if args.layer_decay is not None and not models.is_timm(args.model):
        raise UserError(f"--layer_decay {args.layer_decay}: needs a timm model (it uses the "
                        f"model's block structure); {args.model} is not one, use --head_lr_mult")
    resize = model_defaults(args)["resize"]
    if min(resize) < 16 or max(resize) > 4096:
        raise UserError(f"--resize {resize[0]} {resize[1]}: expected H W of 16 to 4096 pixels")
    check_user_model(args, resize)


def check_user_model(args: argparse.Namespace, resize: list[int]) -> None:
    """--model module:function: imported, called with num_classes (and --model_args) and run on
    dummy images of --resize's size, before any photo is decoded."""
    if not models.is_user_model(args.model):
        if args.model_args:
            raise UserError(f"--model_args {args.model_args}: only for a --model module:function "
                            f"network; {args.model} takes none")
        return
    models.check_user_model_flags(args.model, pretrained=args.pretrained,
                                  cosine_head=args.criterion == "arcface",
                                  drop_rate=args.drop_rate)
    outputs = (sum(labels.HEAD_SIZES) if args.multi_head
               else labels.num_outputs(args.category, args.age_label_num))
    models.check_user_model(args.model, outputs, models.model_args_of(args.model_args),
                            tuple(resize))


def check_resume_checkpoints(args: argparse.Namespace, lasts: dict[Path, dict]) -> None:
    """--resume: every last.pth of the run (``lasts``: path -> mapped checkpoint) holds the EMA
    weights --model_ema needs (checked before the run's config.json is rewritten)."""
    for path, saved in lasts.items():
        if args.model_ema and saved.get("ema") is None:
            raise UserError(f"--model_ema: {path} was trained without it and holds no EMA "
                            "weights to resume; resume without --model_ema")


def model_defaults(args: argparse.Namespace) -> dict:
    """What a run's --resize (when not given), --normalize auto and --interpolation auto mean:
    a timm model with --pretrained or --weights brings its pretrained_cfg's input size, mean/std
    ('model') and interpolation, since its weights learned on them; a model that takes one input
    size only gets that size; anything else gets the toolkit's own (128x96, ImageNet, area).
    Values the user gave are kept; train.py records the result in config.json."""
    cfg = models.timm_pretrained_cfg(args.model) if models.is_timm(args.model) else None
    own = cfg if cfg and (args.pretrained or args.weights) else None
    fixed = models.fixed_input_size(args.model)
    resize = args.resize or (fixed or (own and own["input_size"][1:]) or config.DEFAULT_RESIZE)
    normalize = args.normalize
    if normalize == "auto":
        normalize = "model" if own and own.get("mean") else "imagenet"
    interpolation = args.interpolation
    if interpolation == "auto":
        wanted = own and own.get("interpolation")
        interpolation = "area" if not own else (
            wanted if wanted in image_cache.INTERPOLATIONS else "bilinear")
    return {"resize": [int(v) for v in resize], "normalize": normalize,
            "interpolation": interpolation}


def model_normalization(model_name: str) -> tuple[list, list]:
    """(mean, std) of a timm model's pretrained_cfg: --normalize model."""
    cfg = models.timm_pretrained_cfg(model_name)
    return [float(v) for v in cfg["mean"]], [float(v) for v in cfg["std"]]


def say_model_defaults(args: argparse.Namespace, resolved: dict, say=print) -> None:
    """One line when the model's own preprocessing (timm's pretrained_cfg) replaced the toolkit's."""
    taken = []
    if args.resize is None and tuple(resolved["resize"]) != config.DEFAULT_RESIZE:
        taken.append("input size {}x{}".format(*resolved["resize"]))
    if args.normalize == "auto" and resolved["normalize"] == "model" and not (
            getattr(args, "mean", None) and getattr(args, "std", None)):
        mean, std = model_normalization(args.model)
        taken.append(f"mean {[round(v, 4) for v in mean]} std {[round(v, 4) for v in std]}")
    if args.interpolation == "auto" and resolved["interpolation"] != "area":
        taken.append(f"{resolved['interpolation']} resizing")
    if taken:
        say(f"model preprocessing: {', '.join(taken)} from {args.model}'s timm pretrained_cfg "
            "(--resize, --normalize, --interpolation override it)")


def preprocess_of(flags: dict) -> image_cache.Preprocess:
    """The deterministic image pipeline (crop, size, edges, interpolation) of resolved flags: what
    the run's cache holds and what its checkpoints tell inference."""
    crop = flags["crop"] or ("center" if flags.get("crop_size") else
                             augmentation.augmentation_spec(flags["augmentation"]).crop)
    # the margin only shapes face crops: other crops keep the stored default, so their cache names
    # and checkpoints stay as they were when --face_margin's default changed (0.4 -> 0.1)
    face_margin = flags["face_margin"] if crop == "face" else image_cache.Preprocess.face_margin
    return image_cache.Preprocess(resize=tuple(flags["resize"]), crop=crop, canny=flags["canny"],
                                  face_margin=face_margin,
                                  interpolation=flags["interpolation"],
                                  crop_margin=flags["crop_margin"],
                                  crop_size=tuple(flags["crop_size"]) if flags.get("crop_size")
                                  else None)


def run_precision(args: argparse.Namespace, device, last: dict | None) -> mixed_precision.Precision:
    """--amp and --channels_last resolved for this run (config.json records the result). A resumed
    run keeps what its checkpoints trained with (``last``, its first last.pth: every fold trained
    alike): config.json already holds it (parse_args refuses flags that differ), except in runs
    of older versions, whose 'auto' may now mean bf16."""
    asked = mixed_precision.choose_precision(args.amp, args.channels_last, device, args.model)
    if last is None:  # a new run, or one killed before its first checkpoint
        return asked
    kept = mixed_precision.recorded_precision(last, device)
    return mixed_precision.Precision(kept.autocast_dtype, kept.channels_last,
                                     "as the run trained" + (f"; {kept.reason}" if kept.reason
                                                             else ""))
