"""train.py's flags: each with its default (in argument groups), the limits each value must meet,
and the replay of a saved config.json (--config, --resume), all checked before any data loads.

Standard library only at import: the registries behind --model, --criterion, --optimizer and the
other names (modules that import torch) are read only when a value is checked, so
`python train.py --help` answers at once. settings.py turns the parsed flags into a run's
resolved settings.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from maskface import presets, run_folder
from maskface.cli import FlagParser, LazyChoices, UserError, registry
from maskface.files import check_output_path, read_json_checked
from maskface.labels import CATEGORY_CLASSES

# old spellings of the competition's code, accepted but not listed in --help
ALIASES = {"--age_lable_num": "--age_label_num"}
# flags that were on/off switches: config.json files of older runs hold true/false for them
WERE_BOOLEAN = {"channels_last": {True: "on", False: "off"}}
DEFAULT_RESIZE = (128, 96)  # H, W: the toolkit's own input size (BaseModel on a CPU)
NORMALIZE_MODES = ("auto", "imagenet", "dataset", "model")
CLASS_WEIGHTS_BETA = 0.999  # loss.EFFECTIVE_BETA: Cui et al. 2019 try 0.9 .. 0.9999


def augmentation_value(text: str) -> str:
    """argparse type of --augmentation: a preset name or the shape of a pipeline reference (the
    pipeline itself is loaded and checked when the settings are resolved)."""
    from maskface import augmentation  # imports torch: after --help, when a value is checked
    try:
        augmentation.augmentation_spec(text)
    except UserError:
        raise argparse.ArgumentTypeError(
            f"invalid choice: '{text}' ({augmentation.choices_text()})") from None
    return text


# flags a resumed run may change: they decide how long and where it runs, not what it computes
RESUME_SAFE = ("epochs", "early_stopping_patience", "log_interval", "valid_batch_size",
               "num_workers", "cache_dir", "device", "compile", "data_dir", "augment_workers",
               "log_seconds", "progress")
# ... and those that only say how this call runs, never saved in config.json
NOT_SAVED = ("resume", "config", "fold", "accept_data_change")
# config.json's record of where a run came from (run_folder.TRACKING): never a setting, so a
# replay (--config, --resume) ignores it
PROJECT_ROOT = Path(__file__).resolve().parents[1]
GIT_TIMEOUT_S = 10


def get_args_parser() -> FlagParser:
    p = FlagParser(description="Train a face-mask classifier. Every flag is also accepted with "
                               "hyphens (--batch-size for --batch_size).", aliases=ALIASES)
    run = p.add_argument_group("run")
    run.add_argument("--seed", type=int, default=42, help="random seed (split, init, order, augmentation)")
    run.add_argument("--epochs", type=int, default=1, help="number of epochs")
    run.add_argument("--name", default="exp", help="run folder name under --model_dir (exp, exp2, ...)")
    run.add_argument("--model_dir", default=os.environ.get("SM_MODEL_DIR", "./model"),
                     help="where run folders go ($SM_MODEL_DIR if set)")
    run.add_argument("--config", default=None,
                     help="a saved config.json replayed as defaults; flags override (the seed "
                          "code's config.json too: each key mapped or named as ignored)")
    run.add_argument("--defaults", default="toolkit", choices=tuple(presets.PRESETS),
                     help="whose values the flags not given take: this toolkit's; seed (the "
                          "seed team's train.py: sgd with momentum, weight decay 0.01, "
                          "lr_decay_step 5, tmax 5, maxlr 0.1, patience 4, 30 epochs at 256x192; "
                          "its --optimizer sgd read as momentum); baseline (the competition's "
                          "baseline: 1 epoch, MaskBaseDataset, BaseAugmentation, plain sgd, "
                          "weight decay 5e-4). Recorded in config.json (docs/training.md)")
    run.add_argument("--resume", default=None, metavar="RUN_DIR",
                     help="continue the run in RUN_DIR from last.pth, with its settings, split "
                          "or folds and data; only " + ", ".join(f"--{k}" for k in RESUME_SAFE)
                          + " may be changed")
    run.add_argument("--accept_data_change", action="store_true",
                     help="with --resume: go on although photos were added, removed or changed "
                          "since the run started (new people are left out); refused otherwise")
    run.add_argument("--log_interval", type=int, default=20,
                     help="batches between TensorBoard loss points and between progress lines")
    run.add_argument("--log_seconds", type=float, default=30.0,
                     help="progress lines: one sooner when this many seconds pass without one "
                          "(0 = every --log_interval batches only)")
    run.add_argument("--progress", default="auto", choices=registry("progress", "MODES"),
                     help="while training: bar (tqdm, naming the fold, with the run's ETA), "
                          "lines (plain lines: images/s, loss, ETAs of the epoch and the run), "
                          "off; auto = bar when stdout and stderr are terminals, else lines "
                          "(nohup, a notebook, a pipe)")

    data = p.add_argument_group("data")
    data.add_argument("--data_dir", default=None,
                      help="train images folder ($SM_CHANNEL_TRAIN, else the bundled sample)")
    data.add_argument("--dataset", default="MaskSplitByProfileDataset", choices=registry("dataset", "SPLITS"),
                      help="MaskSplitByProfileDataset splits people; MaskBaseDataset splits images "
                           "and LEAKS people across train and val")
    data.add_argument("--val_ratio", type=float, default=0.2, help="share of people (or images) in validation")
    data.add_argument("--kfold", type=int, default=0, help="train K fold models (0 = one train/val split)")
    data.add_argument("--folds", default=None, metavar="CSV",
                      help="reuse a folds.csv (profile,fold) of an earlier run, to compare models "
                           "on the same folds")
    data.add_argument("--fold", type=int, default=None,
                      help="with --kfold: train only this fold (spread folds over GPUs with a shell "
                           "loop); a later fold into the existing run folder --name is that run: "
                           "its settings and folds, other flags refused as for --resume")
    data.add_argument("--category", default="multi", choices=list(CATEGORY_CLASSES),
                      help="predict the 18 classes or one of mask/gender/age")
    data.add_argument("--age_label_num", type=int, default=3, choices=(3, 6),
                      help="age classes trained: 3 groups, or 6 bins folded to 3 for scoring "
                           "(--age_lable_num works too)")
    data.add_argument("--old_age", type=int, default=60,
                      help="first age trained as 60+ (validation always scores with the true 60)")
    data.add_argument("--drop_ages", default=None, metavar="LO-HI",
                      help="leave people aged LO..HI out of training only, e.g. 57-59")
    data.add_argument("--relabel", default=None, metavar="CSV", help="relabel file: id,gender,age,swap_mask")
    data.add_argument("--data_balancing", default="imbalance", choices=registry("dataset", "BALANCING"),
                      help="oversample train people by gender x decade (10s) or gender x age group (gene)")
    data.add_argument("--weightsampler", action="store_true",
                      help="sample train images inversely to class size")
    data.add_argument("--cache_dir", default=".cache", help="where decoded, cropped, resized images are kept")
    data.add_argument("--num_workers", type=int, default=0,
                      help="threads decoding images into the cache (0 = one per core); training "
                           "reads the cache and needs no loader workers")

    images = p.add_argument_group("images and augmentation")
    images.add_argument("--resize", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="model input size (when not given: %d %d; a timm model's own with "
                             "--pretrained or --weights, and the only size a ViT-like model "
                             "takes)" % DEFAULT_RESIZE)
    images.add_argument("--augmentation", default="CustomAugmentation",
                        type=augmentation_value,
                        help="a preset, run on whole batches on the training device (docs/"
                             "augmentation.md lists them; a wrong name lists them too), or a "
                             "user pipeline run per image on the CPU: a file saved by "
                             "albumentations' A.save (.json/.yaml/.yml), or module:function "
                             "returning an albumentations or torchvision v2 pipeline (module: a "
                             ".py path or an importable module)")
    images.add_argument("--augmentation_sha256", default=None, metavar="HEX",
                        help="sha256 the --augmentation file (pipeline file or module) must have "
                             "(when not given: not checked); config.json records it, so a replay "
                             "(--config, --resume) refuses a changed file")
    images.add_argument("--augment_workers", type=int, default=None, metavar="N",
                        help="processes running a per-image pipeline while the model trains (0 = "
                             "in the training process; when not given: one per core but one, 1..8)")
    images.add_argument("--crop_margin", type=float, default=0.0, metavar="M",
                        help="cache M of the crop's height and width more on each side (0.1: "
                             "1.2x the size), for random crops in training: a random --resize box, "
                             "or with --rrc_scale a random-resized crop; evaluation takes the "
                             "centred box, the crop of M = 0")
    images.add_argument("--rrc_scale", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                        help="random-resized crops in training (when not given: off): area range "
                             "as a fraction of the cached image (with --crop_margin: of the crop "
                             "and its margin), e.g. 0.5 1")
    images.add_argument("--rrc_ratio", type=float, nargs=2, default=[3 / 4, 4 / 3],
                        metavar=("LO", "HI"),
                        help="aspect range of --rrc_scale crops relative to --resize's (1 = no "
                             "stretch; default: 3/4 4/3, as torchvision's)")
    images.add_argument("--crop", default=None, choices=registry("image_cache", "CROPS"),
                        help="crop before resizing (when not given: the augmentation's; face = "
                             "detected face box)")
    images.add_argument("--crop_size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="a centre crop of H x W photo pixels before --resize, placed as "
                             "torchvision's CenterCrop (e.g. 320 256, then --resize 224 224); a "
                             "photo smaller than it is refused, not padded. With --crop center "
                             "(implied); when not given: the baseline's centre box made to "
                             "--resize's aspect")
    images.add_argument("--face_margin", type=float, default=0.1,  # face.DEFAULT_MARGIN
                        help="--crop face: the face box (hairline to chin) grown by this fraction "
                             "per side, then made to --resize's aspect, so the resize does not "
                             "distort it; 0.1 measured best on the dev set (docs/face_crops.md: "
                             "0.4 left the face ~40%% smaller than a centre crop does)")
    images.add_argument("--canny", action="store_true", help="add a Canny-edge channel through a learned 1x1 conv")
    images.add_argument("--normalize", default="auto", choices=NORMALIZE_MODES,
                        help="mean/std: imagenet; dataset (the training images' own); model (a "
                             "timm model's pretrained_cfg); auto = model for a timm model with "
                             "--pretrained or --weights, else imagenet")
    images.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                        help="per-channel mean on the 0-1 scale, as torchvision's Normalize "
                             "(e.g. 0.548 0.504 0.479; not 0-255), overriding --normalize's; "
                             "recorded with the run and used by inference")
    images.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                        help="per-channel std on the 0-1 scale, each above 0 (e.g. 0.237 0.247 "
                             "0.246), overriding --normalize's; recorded and used by inference")
    images.add_argument("--interpolation", default="auto",
                        choices=LazyChoices(lambda: ("auto", *registry("image_cache", "INTERPOLATIONS")), "interpolations"),
                        help="resizing into the cache: area (OpenCV area averaging); bilinear or "
                             "bicubic (Pillow, as timm's transforms); auto = a timm model's own "
                             "with --pretrained or --weights, else area")
    images.add_argument("--mixup", action="store_true", help="MixUp batches (soft targets)")
    images.add_argument("--cutmix", action="store_true", help="CutMix batches (soft targets)")
    images.add_argument("--mixup_alpha", type=float, default=0.2, help="MixUp Beta(alpha, alpha)")
    images.add_argument("--cutmix_alpha", type=float, default=1.0, help="CutMix Beta(alpha, alpha)")

    net = p.add_argument_group("model")
    net.add_argument("--model", default="BaseModel",
                     help="BaseModel; resnet18, mobilenet_v2, efficientnet_b0 and the other bare "
                          "torchvision names (tv_<name> for any torchvision classifier); any timm "
                          "name (timm/<name> where torchvision has it too); hf-hub:<org>/<repo>. "
                          "A wrong name lists the choices (docs/training.md)")
    net.add_argument("--model_args", default=None, metavar="JSON",
                     help="with --model module:function: keyword arguments of the function as a "
                          "JSON object, e.g. '{\"width\": 32}' (recorded with the run)")
    net.add_argument("--multi_head", action="store_true",
                     help="one backbone, three heads (mask, gender, age); 18-class p = product of heads")
    net.add_argument("--pretrained", action="store_true",
                     help="timm hub weights (internet, or HF_HUB_OFFLINE=1 and a local hub cache); "
                          "the model's own input size, mean/std and interpolation come with them")
    net.add_argument("--weights", default=None, metavar="FILE",
                     help="local pretrained state dict; heads of another size are re-initialised")
    net.add_argument("--drop_rate", type=float, default=0.0, help="dropout before the classifier")

    crit = p.add_argument_group("loss")
    # the seed code's switch for --criterion arcface; before --criterion, so that tables of the
    # flags by dest keep --criterion's action, and without a default of its own
    crit.add_argument("--arcface", dest="criterion", action="store_const", const="arcface",
                      default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    crit.add_argument("--criterion", default="cross_entropy", choices=registry("loss", "LOSSES"),
                      help="loss (maskface/loss.py; a wrong name lists them)")
    crit.add_argument("--smoothing", type=float, default=0.1, help="label_smoothing strength")
    crit.add_argument("--focal_gamma", type=float, default=2.0, help="focal loss gamma")
    crit.add_argument("--arc_scale", type=float, default=30.0, help="arcface logit scale")
    crit.add_argument("--arc_margin", type=float, default=0.5, help="arcface angular margin (radians)")
    crit.add_argument("--class_weights", default="none", choices=registry("loss", "CLASS_WEIGHTS"),
                      help="weigh every loss by class, from the training photos: balanced = "
                           "inverse frequency; effective = inverse effective number of samples "
                           "(Cui et al. 2019); per head for --multi_head")
    crit.add_argument("--class_weights_beta", type=float, default=CLASS_WEIGHTS_BETA,
                      help="effective: beta of (1 - beta^n) / (1 - beta); 0 weighs classes "
                           "alike, nearer 1 nearer balanced")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--batch_size", type=int, default=64, help="training batch size")
    opt.add_argument("--valid_batch_size", type=int, default=1000, help="validation batch size")
    opt.add_argument("--optimizer", default="adam", choices=registry("engine", "OPTIMIZERS"),
                     help="torch's sgd, momentum, adam, adamw, adagrad; or any of timm's "
                          "(create_optimizer_v2; a wrong name lists them)")
    opt.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    opt.add_argument("--head_lr_mult", type=float, default=1.0,
                     help="the heads (new layers) learn at lr x this; e.g. 10 for a pretrained "
                          "backbone that should move slowly")
    opt.add_argument("--layer_decay", type=float, default=None,
                     help="timm models: layer-wise lr decay, each block lr x this^(depth from "
                          "the top), e.g. 0.75")
    opt.add_argument("--momentum", type=float, default=0.9, help="momentum (optimizer momentum)")
    opt.add_argument("--weight_decay", type=float, default=0.0, help="weight decay")
    opt.add_argument("--scheduler", default="steplr", choices=registry("engine", "SCHEDULERS"),
                     help="learning-rate schedule: torch's steplr, lambdalr, exponentiallr, "
                          "cycliclr, cosineannealinglr, reducelronplateau; timm's cosine, tanh, "
                          "poly, step, wsd, constant (per update, their own warm-up from "
                          "--warmup_lr, floor --min_lr)")
    opt.add_argument("--lr_decay_step", type=int, default=20, help="steplr: epochs between decays")
    opt.add_argument("--gamma", type=float, default=0.5, help="steplr/exponentiallr/lambdalr decay factor")
    opt.add_argument("--tmax", type=int, default=None,
                     help="cosineannealinglr and timm schedules: period in epochs (when not "
                          "given: --epochs); cycliclr: epochs per half-cycle, stepped per epoch "
                          "as the seed code does (when not given: one epoch, stepped per batch)")
    opt.add_argument("--min_lr", type=float, default=0.0, help="timm schedules: the lr floor")
    opt.add_argument("--warmup_lr", type=float, default=1e-5,
                     help="timm schedules: the lr the warm-up starts from")
    opt.add_argument("--maxlr", type=float, default=None, help="cycliclr upper lr (when not given: 10 x --lr)")
    opt.add_argument("--mode", default=None, choices=presets.PLATEAU_MODES + presets.CYCLIC_MODES,
                     help="reducelronplateau: min watches val loss, max val F1 (when not given: "
                          "max); cycliclr: triangular, triangular2 or exp_range (amplitude x "
                          "--gamma per step; when not given: triangular)")
    opt.add_argument("--factor", type=float, default=0.5, help="reducelronplateau factor")
    opt.add_argument("--patience", type=int, default=2, help="reducelronplateau patience (epochs)")
    opt.add_argument("--threshold", type=float, default=1e-4, help="reducelronplateau threshold")
    opt.add_argument("--warmup_epochs", type=int, default=0, help="linear lr warm-up epochs")
    opt.add_argument("--early_stopping_patience", type=int, default=5,
                     help="stop after N epochs without a better val F1 (0 or -1 = off)")
    opt.add_argument("--grad_accum_steps", type=int, default=1,
                     help="batches whose gradients add up to one optimizer update (an effective "
                          "batch of N x --batch_size)")
    opt.add_argument("--clip_grad", type=float, default=None,
                     help="clip gradients to this norm (or value, --clip_mode) before each update")
    opt.add_argument("--clip_mode", default="norm", choices=registry("engine", "CLIP_MODES"),
                     help="norm, value or agc (adaptive), as timm's dispatch_clip_grad")
    opt.add_argument("--model_ema", action="store_true",
                     help="keep an exponential moving average of the weights (timm's ModelEmaV3), "
                          "validated each epoch; best.pth holds the better of model and EMA")
    opt.add_argument("--model_ema_decay", type=float, default=0.9998,
                     help="EMA decay per update, 0 < decay < 1 (short runs: 0.99 or "
                          "--model_ema_warmup)")
    opt.add_argument("--model_ema_warmup", action="store_true",
                     help="EMA decay ramps up as 1 - (1 + update)^(-2/3) to --model_ema_decay")

    speed = p.add_argument_group("speed")
    speed.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    speed.add_argument("--amp", default="auto", choices=registry("mixed_precision", "AMP_MODES"),
                       help="mixed precision. auto: bf16 on CUDA, and on a CPU with native bf16 "
                            "(AMX / AVX-512 BF16) for models measured to gain from it; else fp32. "
                            "off: fp32. The choice is printed and recorded in config.json")
    speed.add_argument("--channels_last", nargs="?", const="on", default="auto",
                       choices=registry("mixed_precision", "CHANNELS_LAST_MODES"),
                       help="channels_last memory format (auto: on on a CPU and where --amp "
                            "runs autocast; the bare flag means on)")
    speed.add_argument("--compile", action="store_true", help="torch.compile the model")
    speed.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower on GPU)")

    dist = p.add_argument_group("distributed", "torchrun --nproc_per_node N train.py ... trains one "
                                               "model on N processes (DDP; gloo on CPU)")
    dist.add_argument("--sync_bn", action="store_true", help="SyncBatchNorm across torchrun processes")
    return p


def parse_args(argv: list[str] | None = None, say=None) -> argparse.Namespace:
    """Parse flags; --defaults' preset replaces the toolkit's defaults; --config replays a saved
    config.json (this toolkit's or the seed code's) under the flags actually given; --resume
    (and --fold into a k-fold run folder that exists) continues that run: its recorded settings,
    as run_folder.run_record decides them from config.json and its checkpoints, with only the
    RESUME_SAFE flags changed. ``say`` (a warning line on stderr when not given) hears what the
    run reads differently from what was typed: seed meanings, ignored flags."""
    if say is None:
        def say(line: str) -> None:
            print(f"warning: {line}", file=sys.stderr)
    if argv is None:
        argv = sys.argv[1:]
    parser = get_args_parser()
    args = parser.parse_args(argv)
    typed = typed_flags(argv)
    if args.resume and args.config:
        # a resume continues its own run; replaying another file over it would train a different
        # experiment under the run's name (and rewrite its config.json)
        raise UserError(f"--resume {args.resume} and --config {args.config}: give one; a resumed "
                        "run replays its own config.json")
    if not args.resume and args.fold is not None and not args.config:
        joined = Path(args.model_dir) / args.name
        if (joined / run_folder.CONFIG).is_file():
            # another fold of a run that exists: the same run, so its settings and folds hold
            args.resume = str(joined)
            if argv is None:
                argv = sys.argv[1:]
            argv = [*argv, "--resume", str(joined)]
    known = {a.dest for a in parser._actions}
    if args.config:
        replay, saved = args.config, read_json_checked(args.config)
        saved.pop(run_folder.RUN_ID, None)  # a replay is a new run, with an identity of its own
        if presets.is_seed_config(saved):
            saved, line = presets.import_seed_config(saved, known, args.config)
            say(line)
    elif args.resume:
        if not (Path(args.resume) / run_folder.CONFIG).is_file():
            raise UserError(f"--resume {args.resume}: not a run folder (no config.json there)")
        replay = str(Path(args.resume) / run_folder.CONFIG)
        saved = run_record(Path(args.resume))
    else:
        if args.defaults != "toolkit":
            parser.set_defaults(**presets.PRESETS[args.defaults])
            args = parser.parse_args(argv)
        return finish(args, typed, say)
    saved.pop(run_folder.TRACKING, None)  # where the run came from, not how to train
    unknown = sorted(set(saved) - known - {run_folder.RUN_ID})
    if unknown:
        raise UserError(f"{replay}: unknown setting(s) {', '.join(unknown)}")
    run_id = saved.pop(run_folder.RUN_ID, None)
    saved = {k: v for k, v in saved.items() if k not in NOT_SAVED}
    saved.setdefault("interpolation", "area")  # what a run saved before the flag existed used
    saved.setdefault("defaults", "toolkit")  # ... and before --defaults existed
    for action in parser._actions:
        if action.dest in saved and action.help != argparse.SUPPRESS:
            saved[action.dest] = whole_numbers(action, saved[action.dest])
            check_replayed(action, saved[action.dest], replay)
    for dest, values in WERE_BOOLEAN.items():  # run folders of older versions
        if isinstance(saved.get(dest), bool):
            saved[dest] = values[saved[dest]]
    preset = args.defaults if "defaults" in typed else saved["defaults"]
    parser.set_defaults(**presets.PRESETS.get(preset, {}))  # beneath the record: it holds them all
    parser.set_defaults(**saved)
    replayed = parser.parse_args(argv)
    from maskface.pipelines import resolved_value  # imports torch: only when a run is replayed
    if args.augmentation_sha256 is None and \
            resolved_value(replayed.augmentation) != saved.get("augmentation"):
        replayed.augmentation_sha256 = None  # the recorded hash is of the replayed pipeline
    replayed = finish(replayed, typed, say)
    if replayed.resume:
        check_resumed_settings(replayed, saved, replay)
        replayed.run_id = run_id
    return replayed


def typed_flags(argv: list[str]) -> list[str]:
    """The flags (dests) ``argv`` gives, in the order given: what the user typed, as against what
    defaults, presets and replays filled in."""
    parser = get_args_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given, _ = parser.parse_known_args(argv)
    return list(vars(given))


def finish(args: argparse.Namespace, typed: list[str], say) -> argparse.Namespace:
    """What the parsed flags leave open, decided, and what the user typed checked against it:
    the seed's reading of --optimizer sgd under --defaults seed, --mode for the scheduler in use
    (one error line for a mode it does not have), then a line per typed flag the seed code would
    have read differently (without --defaults seed) and per typed flag this run ignores."""
    if args.defaults == "seed" and "optimizer" in typed and args.optimizer == "sgd":
        args.optimizer = "momentum"
        say("--optimizer sgd: read as the seed code reads it, SGD with --momentum "
            f"{args.momentum} (recorded as --optimizer momentum)")
    modes = {"cycliclr": presets.CYCLIC_MODES, "reducelronplateau": presets.PLATEAU_MODES}
    own = modes.get(args.scheduler)
    if "mode" in typed and own and args.mode not in own:
        raise UserError(f"--mode {args.mode}: --scheduler {args.scheduler} takes "
                        + ", ".join(own) + "; " + ", ".join(
                            f"{', '.join(m)} belong to {name}" for name, m in modes.items()
                            if name != args.scheduler))
    if args.mode is None or own and args.mode not in own and not args.resume:
        # unset, or a replayed record's mode of another scheduler: the one in use decides; a
        # resumed cycliclr run of an older version keeps its recorded 'max' (it trained triangular)
        args.mode = own[0] if own == presets.CYCLIC_MODES else "max"
    values = vars(args)
    if args.defaults != "seed":
        for line in presets.seed_warnings(values, typed):
            say(line)
    for flag in typed:
        if flag in USED_WHEN and not USED_WHEN[flag][0](args):
            say(f"--{flag} {presets.show(values[flag])} is ignored: {USED_WHEN[flag][1]}")
    return args


def run_record(run_dir: Path) -> dict:
    """The settings a run trained with: its config.json, checked against the "config" every
    checkpoint of the run records (run_folder.check_run_record), keys missing from config.json
    taken from them. A checkpoint of another run, or a record that disagrees with its
    checkpoints, is refused."""
    from maskface.checkpoint import load_checkpoint  # imports torch: only when a run is resumed
    recorded = read_json_checked(run_dir / run_folder.CONFIG)
    checkpoints = {path: load_checkpoint(path, mmap=True)
                   for path in run_folder.run_checkpoints(run_dir)}
    return run_folder.check_run_record(run_dir, recorded, checkpoints, RESUME_SAFE + NOT_SAVED)


def git_state(root: Path = PROJECT_ROOT) -> dict:
    """{"commit": HEAD's full hash, "dirty": whether tracked or untracked files differ from it}
    of the git checkout at ``root``; both None where git is missing, ``root`` is no checkout, or
    git does not answer in GIT_TIMEOUT_S (never an error: a copy without git still trains)."""
    def git(*argv: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *argv], capture_output=True, text=True,
                                  timeout=GIT_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None
    commit = git("rev-parse", "--show-toplevel")
    # a folder inside another project's checkout (a copy unpacked in a user's repo) is no checkout
    # of this one: its HEAD would name the wrong code
    if commit is None or Path(commit.strip()).resolve() != Path(root).resolve():
        return {"commit": None, "dirty": None}
    commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    return {"commit": commit.strip() if commit else None,
            "dirty": bool(status.strip()) if commit and status is not None else None}


def tracking_record(preprocess: dict, previous: dict | None = None,
                    argv: list[str] | None = None, root: Path = PROJECT_ROOT) -> dict:
    """config.json's "tracking" block: the code (git commit, dirty), the command line, the start
    time (UTC) and host, and the preprocessing the cache actually held (``preprocess``: crop,
    size, margins). A resumed run keeps its own (``previous``) and adds this call to "resumes"."""
    now = {**git_state(root),
           "command": shlex.join(["python", *(sys.argv if argv is None else argv)]),
           "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "host": socket.gethostname()}
    if isinstance(previous, dict) and previous.get("started"):
        resumes = previous.get("resumes") if isinstance(previous.get("resumes"), list) else []
        return {**previous, "resumes": [*resumes, now]}
    return {**now, "preprocess": preprocess}


def commit_change(previous: dict | None, now: dict) -> str | None:
    """The line a resume says when the code changed since the run started (useful, never a
    refusal: a fix may be why it is resumed); None when the same or unknown."""
    if not isinstance(previous, dict):
        return None
    before, after = previous.get("commit"), now.get("commit")
    if not before or not after or before == after:
        return None
    return (f"note: this run started at commit {before[:7]}, the code is now at {after[:7]}"
            + (" (with uncommitted changes)" if now.get("dirty") else ""))


def whole_numbers(action: argparse.Action, value):
    """2.0 -> 2 where the flag takes integers (JSON writers turn 2 into 2.0); other values as they
    are, for check_replayed to judge."""
    def whole(v):
        return int(v) if isinstance(v, float) and v.is_integer() and abs(v) < 2 ** 63 else v
    if action.type is not int:
        return value
    return [whole(v) for v in value] if isinstance(value, list) else whole(value)


def check_resumed_settings(args: argparse.Namespace, saved: dict, source: str) -> None:
    """A resume continues the same experiment: a flag that would change what it computes (any but
    RESUME_SAFE) is refused in one line naming it, so config.json stays what trained."""
    changed = [k for k, v in saved.items()
               if k not in RESUME_SAFE and k in vars(args) and getattr(args, k) != v]
    if changed:
        key = changed[0]
        raise UserError(f"--resume {args.resume}: --{key} {json.dumps(getattr(args, key))} differs "
                        f"from the run's {json.dumps(saved[key])} ({source}); a resumed run keeps its "
                        "settings except " + ", ".join(f"--{k}" for k in RESUME_SAFE)
                        + "; start a new run (--config) to change them")


def check_replayed(action: argparse.Action, value, source: str) -> None:
    """A setting of a saved config.json has the shape and type its flag would give (a hand-edited
    file skips argparse's conversion, so '"resize": 32' would fail deep inside training)."""
    names = {int: "an integer", float: "a number"}
    expected = names.get(action.type, "a string")
    if action.dest in WERE_BOOLEAN and not isinstance(value, bool):
        fits = value in action.choices
        expected = "true or false (older runs) or one of " + ", ".join(action.choices)
    elif action.dest in WERE_BOOLEAN:
        return
    elif action.nargs == 0:  # store_true / store_false
        expected, fits = "true or false", isinstance(value, bool)
    elif value is None:  # only a flag whose default is None (--rrc_scale, --tmax) may stay unset:
        # null elsewhere ("scheduler": null) would fall through to some other behaviour silently
        fits = action.default is None
        if isinstance(action.nargs, int):
            expected = f"a list of {action.nargs} values"
    elif isinstance(action.nargs, int):
        expected = f"a list of {action.nargs} values"
        fits = isinstance(value, list) and len(value) == action.nargs and all(
            action.type is None or isinstance(v, action.type) for v in value)
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


# flag -> (is the value fine?, what was expected): checked before any data loads
LIMITS = {
    "epochs": (lambda v: 1 <= v <= 1_000_000, "1 to 1,000,000"),
    "batch_size": (lambda v: 1 <= v <= 65_536, "1 to 65,536"),
    "valid_batch_size": (lambda v: 1 <= v <= 65_536, "1 to 65,536"),
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
    "log_seconds": (lambda v: v >= 0, "0 (every --log_interval batches only) or more seconds"),
    "num_workers": (lambda v: 0 <= v <= 256, "0 (one per core) to 256"),
    "seed": (lambda v: 0 <= v < 2 ** 32, "0 <= seed < 2**32"),
    "mixup_alpha": (lambda v: v > 0, "a Beta parameter above 0"),
    "cutmix_alpha": (lambda v: v > 0, "a Beta parameter above 0"),
    "smoothing": (lambda v: 0 <= v < 1, "0 <= smoothing < 1"),
    "focal_gamma": (lambda v: v >= 0, "0 or more"),
    "arc_scale": (lambda v: v > 0, "a scale above 0"),
    "arc_margin": (lambda v: 0 <= v < math.pi / 2, "0 <= margin < pi/2 radians"),
    "drop_rate": (lambda v: 0 <= v < 1, "0 <= rate < 1"),
    "face_margin": (lambda v: v >= 0, "0 or more (a fraction of the face box per side)"),
    "crop_margin": (lambda v: 0 <= v <= 0.5, "0 <= margin <= 0.5 (a fraction of the crop per side)"),
    "augment_workers": (lambda v: v is None or 0 <= v <= 256, "0 (in the training process) to 256"),
    "old_age": (lambda v: 30 < v <= 150, "an age above 30 (30..old_age-1 is the middle group)"),
    "kfold": (lambda v: v == 0 or 2 <= v <= 1000, "0 (off) or 2 to 1,000 folds"),
    "class_weights_beta": (lambda v: 0 <= v < 1, "0 <= beta < 1"),
    "model_ema_decay": (lambda v: 0 < v < 1, "0 < decay < 1"),
    "grad_accum_steps": (lambda v: v >= 1, "at least 1 batch"),
    "clip_grad": (lambda v: v is None or v > 0, "a clipping threshold above 0"),
    "head_lr_mult": (lambda v: v >= 0, "0 or more (0 freezes the heads)"),
    "layer_decay": (lambda v: v is None or 0 < v <= 1, "0 < decay <= 1"),
    "min_lr": (lambda v: v >= 0, "0 or more"),
    "warmup_lr": (lambda v: v >= 0, "0 or more"),
}


def _timm_schedule(args: argparse.Namespace) -> bool:
    return args.scheduler in registry("engine", "TIMM_SCHEDULERS")


def _validates(args: argparse.Namespace) -> bool:
    return bool(args.kfold or args.folds or args.val_ratio > 0)


_PLATEAU = (lambda a: a.scheduler == "reducelronplateau", "only --scheduler reducelronplateau uses it")
# flag -> (does this run use it?, when it is used): a flag typed for a run that ignores it is
# named at the start of the run (config.finish), so no setting is dropped without a word
USED_WHEN = {
    "maxlr": (lambda a: a.scheduler == "cycliclr", "only --scheduler cycliclr uses it"),
    "mode": (lambda a: a.scheduler in ("cycliclr", "reducelronplateau"),
             "only --scheduler cycliclr and reducelronplateau use it"),
    "factor": _PLATEAU, "patience": _PLATEAU, "threshold": _PLATEAU,
    "lr_decay_step": (lambda a: a.scheduler in ("steplr", "step"),
                      "only --scheduler steplr and step use it"),
    "gamma": (lambda a: a.scheduler in ("steplr", "lambdalr", "exponentiallr", "step")
              or a.scheduler == "cycliclr" and a.mode == "exp_range",
              "only --scheduler steplr, lambdalr, exponentiallr, step and cycliclr with --mode "
              "exp_range use it"),
    "tmax": (lambda a: a.scheduler in ("cycliclr", "cosineannealinglr") or _timm_schedule(a),
             "only --scheduler cycliclr, cosineannealinglr and timm's schedules use it"),
    "min_lr": (_timm_schedule, "only timm's schedules (cosine, tanh, poly, step, wsd, constant) "
                               "use it"),
    "warmup_lr": (_timm_schedule, "only timm's schedules (cosine, tanh, poly, step, wsd, "
                                  "constant) use it"),
    "momentum": (lambda a: a.optimizer not in ("sgd", "adam", "adamw", "adagrad"),
                 "--optimizer sgd, adam, adamw and adagrad have none (momentum: SGD with it)"),
    "mixup_alpha": (lambda a: a.mixup, "only --mixup uses it"),
    "cutmix_alpha": (lambda a: a.cutmix, "only --cutmix uses it"),
    "smoothing": (lambda a: a.criterion == "label_smoothing",
                  "only --criterion label_smoothing uses it"),
    "focal_gamma": (lambda a: a.criterion == "focal", "only --criterion focal uses it"),
    "arc_scale": (lambda a: a.criterion == "arcface", "only --criterion arcface uses it"),
    "arc_margin": (lambda a: a.criterion == "arcface", "only --criterion arcface uses it"),
    "class_weights_beta": (lambda a: a.class_weights == "effective",
                           "only --class_weights effective uses it"),
    "dataset": (lambda a: not (a.kfold or a.folds),
                "k-fold (--kfold, --folds) always splits by person, whatever --dataset says"),
    "val_ratio": (lambda a: not (a.kfold or a.folds),
                  "k-fold (--kfold, --folds) validates each model on its held-out fold"),
    "valid_batch_size": (_validates, "--val_ratio 0 leaves no validation set"),
    "early_stopping_patience": (_validates, "--val_ratio 0 leaves no validation set"),
    "model_ema_decay": (lambda a: a.model_ema, "only --model_ema uses it"),
    "model_ema_warmup": (lambda a: a.model_ema, "only --model_ema uses it"),
    "clip_mode": (lambda a: a.clip_grad is not None, "only --clip_grad uses it"),
    "rrc_ratio": (lambda a: a.rrc_scale is not None, "only --rrc_scale uses it"),
    "face_margin": (lambda a: a.crop in (None, "face"), "only --crop face uses it"),
    "accept_data_change": (lambda a: a.resume, "only --resume uses it"),
}


def check_flags(args: argparse.Namespace) -> None:
    """Reject every bad number, name shape, path or combination of flags: what needs no registry
    and no file's content (settings.resolve_settings checks those next), before data loads."""
    for flag, (fine, expected) in LIMITS.items():
        value = getattr(args, flag)
        if isinstance(value, float) and not math.isfinite(value) or not fine(value):
            raise UserError(f"--{flag} {value}: expected {expected}")
    if (args.name.strip() in ("", ".", "..") or args.name.strip() != args.name
            or Path(args.name).name != args.name or "\\" in args.name):
        raise UserError(f"--name '{args.name}': expected a plain folder name (no '/'); "
                        "use --model_dir for where run folders go")
    check_output_path(args.model_dir, "--model_dir", folder=True)
    check_output_path(args.cache_dir, "--cache_dir", folder=True)
    if args.multi_head and (args.category != "multi" or args.age_label_num != 3):
        raise UserError("--multi_head needs --category multi and --age_label_num 3")
    if args.criterion == "arcface" and args.multi_head:
        raise UserError("--criterion arcface works with single-head models; drop --multi_head")
    if not 0 <= args.val_ratio < 1:
        raise UserError(f"--val_ratio {args.val_ratio}: expected 0 <= ratio < 1")
    if args.fold is not None and not (args.kfold or args.folds):
        raise UserError(f"--fold {args.fold} needs --kfold K or --folds FILE")
    drop_range(args.drop_ages)
    if args.rrc_scale is not None and not 0 < args.rrc_scale[0] <= args.rrc_scale[1] <= 1:
        raise UserError(f"--rrc_scale {args.rrc_scale[0]} {args.rrc_scale[1]}: expected "
                        "0 < LO <= HI <= 1 (area fractions)")
    check_notebook_flags(args)
    if not 0 < args.rrc_ratio[0] <= args.rrc_ratio[1]:
        raise UserError(f"--rrc_ratio {args.rrc_ratio[0]} {args.rrc_ratio[1]}: expected "
                        "0 < LO <= HI (aspect ratios)")
    for flag in ("relabel", "weights", "config", "folds"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            raise UserError(f"--{flag} {path}: file not found")
    if args.resume and not (Path(args.resume) / run_folder.CONFIG).is_file():
        raise UserError(f"--resume {args.resume}: not a run folder (no config.json there)")


def check_notebook_flags(args: argparse.Namespace) -> None:
    """--mean, --std (0-1 scale: 0-255 values are the usual slip) and --crop_size (a centre crop,
    so --crop center or none given)."""
    for flag, fits, expected in (("mean", lambda v: 0 <= v <= 1, "from 0 to 1"),
                                 ("std", lambda v: 0 < v <= 1, "above 0, at most 1")):
        values = getattr(args, flag)
        if values is not None and not all(math.isfinite(v) and fits(v) for v in values):
            shown = " ".join(f"{v:g}" for v in values)
            raise UserError(f"--{flag} {shown}: expected three numbers {expected} (R G B on the "
                            "0-1 scale, as torchvision's Normalize; divide 0-255 values by 255)")
    if args.crop_size is not None:
        height, width = args.crop_size
        if not (16 <= height <= 8192 and 16 <= width <= 8192):
            raise UserError(f"--crop_size {height} {width}: expected H W of 16 to 8192 photo "
                            "pixels")
        if args.crop not in (None, "center"):
            raise UserError(f"--crop_size {height} {width} is a centre crop; --crop {args.crop} "
                            "crops otherwise: give one (or --crop center)")


def drop_range(text: str | None) -> tuple[int, int] | None:
    """--drop_ages 'LO-HI' -> (LO, HI), None when not given; UserError when malformed."""
    if not text:
        return None
    try:
        low, high = (int(v) for v in text.split("-"))
    except ValueError:
        raise UserError(f"--drop_ages '{text}': expected LO-HI, e.g. 57-59") from None
    if low > high:
        raise UserError(f"--drop_ages '{text}': expected LO <= HI, e.g. 57-59")
    return low, high
