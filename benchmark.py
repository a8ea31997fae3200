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
  3. inference with and without flip TTA (predict.predict_views);
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
pipeline (maskface/bench/usual_pipeline.py: PIL + torchvision per image in a DataLoader, a plain fp32 loop
with validation every epoch, inference through the same loader) on the same split, and prints both
times and their ratio (last line: "end to end: toolkit 1.9x faster than the usual pipeline"),
with the wall and CPU seconds of each phase of the toolkit's scripts (startup, cache, epochs,
validation, checkpoints, prediction). With --peer_timm PATH the other job is timm's own train.py
(PATH, run unchanged on an ImageFolder view of the same split; its checkpoint predicts the eval
photos through timm's eval transform):
    python benchmark.py --end_to_end --peer_timm PATH/train.py --data_dir DEV/train/images \
        --eval_dir DEV/eval --model resnet18 --resize 128 96 --epochs 4 --batch_size 32
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys

from maskface.cli import FlagParser, registry, run_cli

# BaseModel at 224x224 on 2 CPU cores: 6 batches x 3 repeats take under a minute when the machine
# is otherwise idle, and stay under 3 minutes with other jobs saturating both cores
DEFAULT_BATCHES = 6
DEFAULT_REPEATS = 3
SMOKE_BATCHES, SMOKE_REPEATS = 2, 1


def get_args_parser() -> FlagParser:
    p = FlagParser(description="Benchmark the toolkit's data path, training loop and inference "
                               "against the competition baseline's loader.")
    add = p.add_argument
    add("--data_dir", default=None,
        help="train images folder ($SM_CHANNEL_TRAIN, else the bundled sample)")
    add("--model", default="BaseModel", help="a model name of train.py --model")
    add("--resize", type=int, nargs=2, default=[224, 224], metavar=("H", "W"), help="model input size")
    add("--batch_size", type=int, default=64, help="batch size of every measurement")
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add("--amp", default="auto", choices=registry("mixed_precision", "AMP_MODES"),
        help="precision timed next to fp32, as train.py --amp (auto: bf16 on CUDA and on a CPU "
             "with native bf16 for models where it pays)")
    add("--channels_last", default="auto", choices=registry("mixed_precision", "CHANNELS_LAST_MODES"),
        help="channels_last memory format, as train.py (auto: on on a CPU and where autocast "
             "runs)")
    add("--augmentation", default="CustomAugmentation", choices=registry("augmentation", "AUGMENTATIONS"),
        help="the toolkit's batch augmentation (train.py's default); its crop also decides "
             "whether the reference loader centre-crops first")
    add("--compare_augmentation", nargs="+", default=[], metavar="VALUE",
        help="also time the data path and training loop with these --augmentation values: "
             "presets or user pipelines (aug.json, module:function), e.g. examples/strong_aug.json "
             "TrivialAugmentWide; off when not given")
    add("--augment_workers", type=int, default=None, metavar="N",
        help="worker processes of the per-image pipelines (as train.py; when not given: one per "
             "core but one, 1..8)")
    add("--optimizer", default="adam", choices=registry("engine", "OPTIMIZERS"), help="optimizer of the train steps")
    add("--compile", action="store_true",
        help="also time the train step torch.compile'd (as train.py --compile)")
    add("--end_to_end", action="store_true",
        help="time whole jobs instead: train.py --epochs + inference.py against the usual "
             "pipeline, back to back")
    add("--epochs", type=int, default=4, help="--end_to_end: epochs of both jobs")
    add("--eval_dir", default=None,
        help="--end_to_end: eval folder with info.csv and images/ ($SM_CHANNEL_EVAL, else the "
             "bundled sample)")
    add("--peer_timm", default=None, metavar="PATH",
        help="--end_to_end: time timm's own train.py (the file at PATH, run unchanged) on the "
             "same people and eval photos instead of the usual pipeline; both jobs' wall and CPU "
             "seconds and busy cores per phase")
    add("--peer_workers", type=int, default=4, metavar="N",
        help="--peer_timm: loader workers of timm's train.py and of its prediction (timm's "
             "default: 4)")
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


def main(args: argparse.Namespace) -> dict:
    """Run every measurement as ``args`` say; prints and returns the results."""
    from maskface.bench import speed  # torch loads after the flags parse: --help is quick
    return speed.run(args)


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
