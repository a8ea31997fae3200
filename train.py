"""Train one model (or one per fold, with out-of-fold predictions) on photos in the competition's
layout.

    python train.py                                  # BaseModel on the bundled sample
    python train.py --model resnet18 --weights r18.pth --resize 224 224 --epochs 10 --crop face
    python train.py --kfold 5 --name r18cv ...       # 5 fold models + oof.csv
    python train.py --resume model/exp3              # continue a killed run

A run folder ``{model_dir}/{name}`` (then name2, name3, ...) holds config.json, best.pth,
last.pth, summary.csv and TensorBoard events; inference needs nothing else. The flags are in
maskface/config.py, the run in maskface/training.py, the epoch loop in maskface/engine.py.
"""
from __future__ import annotations

import argparse
import sys

from maskface import config
from maskface.cli import FlagParser, run_cli


def get_args_parser() -> FlagParser:
    return config.get_args_parser()


def main(args: argparse.Namespace, progress=None) -> dict:
    """Train as ``args`` (parsed flags) say; returns {'run_dir', 'best_f1', ...}. ``progress``
    (tune.py's pruner) hears of every epoch and fold: maskface/training.py's Progress."""
    from maskface import training  # torch and timm load after the flags parse: --help is quick
    return training.train(args, progress)


if __name__ == "__main__":
    sys.exit(run_cli(main, config.parse_args))
