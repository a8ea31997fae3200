"""A stand-in for timm's train.py in tests (CI never needs timm's file): it reads the flags the
benchmark passes, checks the ImageFolder view it was given, trains nothing and writes
<output>/<experiment>/model_best.pth.tar the way timm's CheckpointSaver does (arch, state_dict,
args as an argparse.Namespace)."""
import argparse
import os
from pathlib import Path

import timm
import torch

p = argparse.ArgumentParser()
for flag in ("--data-dir", "--train-split", "--val-split", "--class-map", "--model", "--opt",
             "--output", "--experiment", "--device"):
    p.add_argument(flag)
for flag in ("--num-classes", "--epochs", "-b", "--workers"):
    p.add_argument(flag, type=int)
p.add_argument("--lr", type=float)
p.add_argument("--input-size", type=int, nargs=3)
args = p.parse_args()
if os.environ.get("FAKE_PEER_FAIL"):
    raise SystemExit("fake peer: told to fail")
classes = Path(args.class_map).read_text().split()
assert classes == [f"{k:02d}" for k in range(18)], classes
for split in (args.train_split, args.val_split):
    assert sorted(p.name for p in (Path(args.data_dir) / split).iterdir()) == classes
model = timm.create_model(args.model, num_classes=args.num_classes)
out = Path(args.output) / args.experiment
out.mkdir(parents=True, exist_ok=True)
torch.save({"epoch": args.epochs - 1, "arch": args.model, "state_dict": model.state_dict(),
            "optimizer": {}, "version": 2, "args": args, "metric": 0.0},
           out / "model_best.pth.tar")
