"""User pipelines (albumentations files, module:function), per-image policies, random crops from
a cached margin, hue and random erasing: they train, replay exactly, never reach validation or
inference, and every bad pipeline fails in one line before any photo is decoded (a dead
augmentation worker too)."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import inference
import train
from maskface import augmentation, config, dataset, image_cache, pipelines, submission
from maskface.augmentation import AugmentSpec, BatchAugmentation
from maskface.cli import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]
A = pytest.importorskip("albumentations")

V2_MODULE = '''
from torchvision.transforms import v2
SEEN = []  # images this process's pipeline was applied to


class Counted(v2.Transform):
    def forward(self, image):
        SEEN.append(tuple(image.shape))
        return image


def build():
    return v2.Compose([Counted(), v2.RandomHorizontalFlip(), v2.ColorJitter(0.3, 0.3, 0.3, 0.05)])


def resize():
    return v2.Resize((20, 20))


def floats():
    return v2.ToDtype(__import__("torch").float32, scale=True)


def not_a_transform():
    return "flip please"


def broken():
    raise RuntimeError("no pipeline today")
'''


@pytest.fixture()
def saved_pipeline(tmp_path) -> Path:
    path = tmp_path / "aug.json"
    A.save(A.Compose([A.HorizontalFlip(), A.RandomBrightnessContrast(p=0.8),
                      A.CoarseDropout(p=0.5)]), str(path))
    return path


@pytest.fixture()
def v2_module(tmp_path) -> Path:
    path = tmp_path / "my_aug.py"
    path.write_text(V2_MODULE)
    return path


def run_tiny(run_flags, train_dir, tmp_path, *extra):
    return train.main(config.parse_args(run_flags(train_dir, tmp_path, *extra)))


# ---------------------------------------------------------------------------- user pipelines
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["albumentations_json", "v2_module"])
def test_a_user_pipeline_trains_and_is_recorded(kind, saved_pipeline, v2_module, tiny_train_dir,
                                                tmp_path, run_flags):
    value = str(saved_pipeline) if kind == "albumentations_json" else f"{v2_module}:build"
    source = saved_pipeline if kind == "albumentations_json" else v2_module
    result = run_tiny(run_flags, tiny_train_dir, tmp_path, "--epochs", "1", "--augmentation", value,
                      "--augment_workers", "1")
    run_dir = result["run_dir"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["augmentation"] == value  # tmp_path is absolute already
    assert config["augmentation_sha256"] == pipelines.file_sha256(source)
    # what the checkpoint records reads back with weights_only (the lead's issue 13)
    best = torch.load(run_dir / "best.pth", weights_only=True)
    record = best["augmentation_pipeline"]
    assert record["sha256"] == config["augmentation_sha256"] and record["source"] == str(source)
    if kind == "albumentations_json":
        names = [t["__class_fullname__"] for t in record["serialized"]["transform"]["transforms"]]
        assert names == ["HorizontalFlip", "RandomBrightnessContrast", "CoarseDropout"]
        assert A.from_dict(record["serialized"]) is not None
    assert 0 <= result["best_f1"] <= 1


@pytest.mark.slow
def test_same_seed_same_batches_with_any_worker_count(saved_pipeline, tiny_train_dir, tmp_path):
    frame = dataset.parse_train_dir(tiny_train_dir)
    images = image_cache.build_cache(frame["path"].tolist()[:40], image_cache.Preprocess((32, 24)),
                                     tmp_path / "cache", progress=False)
    pipeline = pipelines.load_pipeline(str(saved_pipeline))

    def batches(seed: int, workers: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        cached = dataset.CachedBatches(images, np.zeros(40, dtype=int), np.arange(40), 16,
                                       shuffle=True, preload=False)
        epochs = pipelines.PipelineBatches(cached, pipeline, workers)
        return [b[0] for _ in range(2) for b in epochs]

    first = batches(0, workers=0)
    again = batches(0, workers=2)
    assert len(first) == len(again) == 6
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other = batches(1, workers=0)
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    # each image its own draw: the pipeline changed some images and left others
    plain = torch.from_numpy(np.array(images))
    changed = [not any(torch.equal(img, p) for p in plain) for b in first for img in b]
    assert any(changed) and not all(changed)


@pytest.mark.slow
def test_resume_with_a_pipeline_continues_exactly(v2_module, tiny_train_dir, tmp_path, run_flags):
    flags = ["--augmentation", f"{v2_module}:build", "--early_stopping_patience", "0",
             "--crop_margin", "0.1", "--rrc_scale", "0.6", "1"]
    whole = run_tiny(run_flags, tiny_train_dir, tmp_path, *flags, "--epochs", "2", "--name", "whole",
                     "--augment_workers", "1")
    part = run_tiny(run_flags, tiny_train_dir, tmp_path, *flags, "--epochs", "1", "--name", "part",
                    "--augment_workers", "0")
    # the worker count may change on a resume: the batches do not depend on it
    train.main(config.parse_args(["--resume", str(part["run_dir"]), "--epochs", "2",
                                 "--augment_workers", "1"]))
    done = torch.load(whole["run_dir"] / "last.pth", weights_only=False)
    resumed = torch.load(part["run_dir"] / "last.pth", weights_only=False)
    assert resumed["epoch"] == done["epoch"] == 2
    for key, tensor in done["model"].items():
        assert torch.equal(tensor, resumed["model"][key]), key


@pytest.mark.slow
def test_validation_and_inference_never_apply_the_pipeline(v2_module, tiny_train_dir, tmp_path,
                                                           run_flags):
    result = run_tiny(run_flags, tiny_train_dir, tmp_path, "--epochs", "2", "--augmentation",
                      f"{v2_module}:build", "--augment_workers", "0", "--val_ratio", "0.25")
    # the module train.py loaded last is the one it trained with, in this process (0 workers)
    module = [m for name, m in sys.modules.items() if name.startswith("maskface_pipeline_")
              and getattr(m, "__file__", None) == str(v2_module)][-1]
    frame = dataset.add_labels(dataset.parse_train_dir(tiny_train_dir))
    train_rows, val_rows = dataset.SPLITS["MaskSplitByProfileDataset"](frame, 0.25, 42)
    # train images only, besides the dummy images its check ran on (it is loaded once)
    seen = 2 * len(train_rows) + pipelines.CHECK_DRAWS
    assert len(val_rows) and len(module.SEEN) == seen
    inference.main(inference.parse_args([
        "--model_dir", str(result["run_dir"]), "--data_dir", str(tiny_train_dir.parents[1] / "eval"),
        "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")]))
    assert len(module.SEEN) == seen


# ---------------------------------------------------------------------------- bad pipelines
BAD = {
    "garbage.json": ("{not json", r"garbage.json: not an albumentations pipeline A.load can read"),
    "other.json": ('{"a": 1}', r"other.json: not an albumentations pipeline A.load can read"),
    "missing.json": (None, r"missing.json: file not found"),
    "missing.yaml": (None, r"missing.yaml: file not found"),
    "my_aug.py:nothing": ("module", r"my_aug.py has no function 'nothing'"),
    "nowhere.py:build": (None, r"nowhere.py: file not found"),
    "no_such_module_xyz:build": (None, r"No module named 'no_such_module_xyz'"),
    "my_aug.py:not_a_transform": ("module", r"not_a_transform\(\) returns a str; expected an "
                                            "albumentations Compose"),
    "my_aug.py:broken": ("module", r"broken\(\) failed \(RuntimeError: no pipeline today\)"),
    "my_aug.py:resize": ("module", r"changes a 32x24x3 image to 20x20x3; expected the same size"),
    "my_aug.py:floats": ("module", r"turns uint8 images into float32; expected uint8"),
    "resize.json": ("resize", r"changes a 32x24x3 image to 16x16x3; expected the same size"),
    "normalize.json": ("normalize", r"turns uint8 images into float32; expected uint8"),
    "hue.yaml": ("hue", r"fails on a 32x24x4 uint8 image"),
    "bad_import.py:build": ("raise ValueError('line one\\nline two')",
                            r"bad_import.py does not import \(ValueError: line one\)$"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_pipeline_fails_in_one_line_before_any_photo_is_decoded(name, v2_module, tmp_path,
                                                                       tiny_train_dir):
    content, expected = BAD[name]
    file_name = name.split(":")[0]
    value = name if "." not in file_name else str(tmp_path / file_name) + name[len(file_name):]
    if content == "module":
        value = str(v2_module) + name[len("my_aug.py"):]
    elif content in ("resize", "normalize", "hue"):
        transform = {"resize": A.Resize(16, 16), "normalize": A.Normalize(),
                     "hue": A.HueSaturationValue(p=1)}[content]
        A.save(A.Compose([transform]), value, data_format="yaml" if name.endswith("yaml") else "json")
    elif content is not None:
        (tmp_path / file_name).write_text(content)
    extra = ["--canny"] if content == "hue" else []  # 4 channels: a colour transform cannot run
    out = tmp_path / "work"
    args = config.parse_args(["--data_dir", str(tiny_train_dir), "--model_dir", str(out / "runs"),
                             "--cache_dir", str(out / "cache"), "--resize", "32", "24",
                             "--augmentation", value, *extra])
    with pytest.raises(UserError, match=expected) as caught:
        train.main(args)
    assert "\n" not in str(caught.value) and str(caught.value).startswith(("--augmentation", value))
    assert not out.exists()  # no cache decoded, no run folder made


@pytest.mark.slow
def test_cli_bad_pipeline_is_one_line_with_exit_code_2(tmp_path):
    bad = tmp_path / "aug.json"
    bad.write_text("{}")
    result = subprocess.run([sys.executable, "train.py", "--augmentation", str(bad),
                             "--data_dir", str(tmp_path / "nowhere")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}")


def test_a_typo_lists_the_presets_and_the_pipeline_forms(capsys):
    with pytest.raises(SystemExit):
        config.parse_args(["--augmentation", "TrivialAugment"])
    err = capsys.readouterr().err
    assert "invalid choice: 'TrivialAugment'" in err and "TrivialAugmentWide" in err
    assert "module:function" in err and ".json" in err


@pytest.mark.slow
def test_a_replay_refuses_a_changed_pipeline_file(saved_pipeline, tiny_train_dir, tmp_path,
                                                  run_flags):
    result = run_tiny(run_flags, tiny_train_dir, tmp_path, "--epochs", "1", "--augmentation",
                      str(saved_pipeline), "--augment_workers", "0")
    run_dir = result["run_dir"]
    A.save(A.Compose([A.VerticalFlip()]), str(saved_pipeline))  # edited after the run
    for flags in (["--resume", str(run_dir), "--epochs", "2"],
                  ["--config", str(run_dir / "config.json")]):
        with pytest.raises(UserError, match=r"aug.json changed since the run recorded it"):
            train.main(config.parse_args(flags))
    # another pipeline on the command line is a new choice, not a changed file
    args = config.parse_args(["--config", str(run_dir / "config.json"), "--augmentation",
                             "FlipAugmentation"])
    assert args.augmentation_sha256 is None


# ---------------------------------------------------------------------------- crops and margin
def test_margin_zero_keeps_todays_crop_and_cache_names():
    assert "crop_margin" not in image_cache.Preprocess().to_dict()
    assert image_cache.Preprocess.from_dict({"resize": [128, 96], "crop": "center"}).crop_margin == 0
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (512, 384, 3), dtype=np.uint8)
    box = image_cache.center_box(384, 512, 64 / 48)
    x0, y0, x1, y1 = box
    today = cv2.resize(photo[y0:y1, x0:x1], (48, 64), interpolation=cv2.INTER_AREA)
    assert np.array_equal(image_cache.preprocess_image(photo, image_cache.Preprocess((64, 48))), today)
    # and the eval view of a margin-0 cache is that crop, normalized
    augment = augmentation.build_augmentation("CustomAugmentation").eval()
    batch = torch.from_numpy(today[None])
    assert torch.equal(augment.centre(batch), batch)


@pytest.mark.parametrize("crop", ["center", "none"])
def test_a_margin_is_cached_around_the_same_crop(crop):
    yy, xx = np.mgrid[0:512, 0:384]
    photo = np.stack([xx * 255 // 383, yy * 255 // 511, (xx + yy) % 256], -1).astype(np.uint8)
    plain = image_cache.preprocess_image(photo, image_cache.Preprocess((64, 48), crop=crop))
    wide = image_cache.Preprocess((64, 48), crop=crop, crop_margin=0.25)
    cached = image_cache.preprocess_image(photo, wide)
    assert wide.margin_pixels == (16, 12) and cached.shape == (96, 72, 3) == (*wide.cached_size, 3)
    centre = BatchAugmentation(AugmentSpec(), margin=wide.margin_pixels).centre(
        torch.from_numpy(cached[None]))[0].numpy()
    # the same region of the photo, resampled from a larger box: equal to within rounding
    difference = np.abs(centre[..., :2].astype(int) - plain[..., :2].astype(int))
    assert difference.mean() < 1.5 and difference.max() <= 8


def test_random_crops_stay_inside_the_cached_margin():
    torch.manual_seed(0)
    height, width, pad_h, pad_w = 40, 30, 6, 5
    # every pixel holds its own coordinates: a crop shows where it came from
    yy, xx = torch.meshgrid(torch.arange(height + 2 * pad_h), torch.arange(width + 2 * pad_w),
                            indexing="ij")
    cached = torch.stack([yy, xx, yy * 0], -1).to(torch.uint8).expand(32, -1, -1, -1).contiguous()
    shifted = BatchAugmentation(AugmentSpec(), margin=(pad_h, pad_w)).train()
    crops = shifted._random_crop_uint8(cached)
    tops, lefts = crops[:, 0, 0, 0].long(), crops[:, 0, 0, 1].long()
    assert tops.max() <= 2 * pad_h and lefts.max() <= 2 * pad_w and len(set(tops.tolist())) > 3
    for crop, top, left in zip(crops, tops, lefts):  # whole, unresampled windows
        assert torch.equal(crop, cached[0, top:top + height, left:left + width])
    resized = BatchAugmentation(AugmentSpec(rrc_scale=(0.3, 1.0)), margin=(pad_h, pad_w)).train()
    scale, offset = resized._crop_boxes(2000, height + 2 * pad_h, width + 2 * pad_w, "cpu")
    low, high = offset - scale, offset + scale  # normalized box edges
    assert (low >= -1 - 1e-6).all() and (high <= 1 + 1e-6).all()
    area = scale.prod(1)
    assert area.min() >= 0.3 - 1e-4 and area.max() <= 1 + 1e-6 and area.std() > 0.1
    out = resized.train()(cached)
    assert out.shape == (32, 3, height, width)
    # the eval view is the centred box, unresampled
    assert torch.equal(resized.eval().centre(cached), cached[:, pad_h:-pad_h, pad_w:-pad_w])


def test_cpu_warp_with_a_margin_matches_the_gpu_path(cpu_and_gpu_warps):
    augment = BatchAugmentation(AugmentSpec(flip=True, rotate=10, rrc_scale=(0.5, 1.0)),
                                margin=(6, 5))
    cpu, reference, _ = cpu_and_gpu_warps(augment, 52, 40)
    assert cpu.shape == reference.shape == (6, 3, 40, 30)
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6))
    assert (cpu[inner] - reference[inner]).abs().max() < 3 / 255


@pytest.mark.slow
def test_train_and_inference_see_the_same_pixels_with_a_margin(tiny_train_dir, tmp_path,
                                                                run_flags):
    result = run_tiny(run_flags, tiny_train_dir, tmp_path, "--epochs", "1", "--crop_margin", "0.2",
                      "--rrc_scale", "0.5", "1", "--cache_dir", str(tmp_path / "cache"))
    best = torch.load(result["run_dir"] / "best.pth", weights_only=True)
    preprocess = image_cache.Preprocess.from_dict(best["preprocess"])
    assert preprocess.crop_margin == 0.2 and preprocess.cached_size == (44, 34)
    eval_dir = tiny_train_dir.parents[1] / "eval"
    out = inference.main(inference.parse_args([
        "--model_dir", str(result["run_dir"]), "--data_dir", str(eval_dir), "--output_dir",
        str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")]))
    assert out["caches"][0].shape[1:3] == (44, 34)
    # inference feeds the model the centred crop: the same probabilities as a margin-0 view of it
    loaded = submission.load_models([result["run_dir"] / "best.pth"], say=lambda _: None)[0]
    centred = np.ascontiguousarray(out["caches"][0][:, 6:-6, 5:-5])
    direct = submission.predict_model(
        submission.LoadedModel(**{**vars(loaded), "preprocess": image_cache.Preprocess((32, 24))}),
        centred, device=torch.device("cpu"), batch_size=64)
    assert np.allclose(direct, out["probs"], atol=1e-6)


@pytest.mark.parametrize("name", ["TrivialAugmentWide", "RandAugment"])
def test_policy_presets_run_per_image(name):
    pipeline = pipelines.load_pipeline(name)
    assert pipeline.kind == "policy" and augmentation.AUGMENTATIONS[name].policy
    pipelines.check_pipeline(pipeline, (32, 24, 3))
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 24, 3), dtype=np.uint8)
    with pipelines.kept_rng():
        out = pipelines.augment_rows(pipeline, images, range(16), seed=3)
        again = pipelines.augment_rows(pipeline, images, range(16), seed=3)
    assert np.array_equal(out, again) and not np.array_equal(out, images)
    assert pipelines.load_pipeline("CustomAugmentation") is None


KILLER = '''
import multiprocessing
import os

from torchvision.transforms import v2


def _die_in_a_worker(image):
    if multiprocessing.parent_process() is not None:  # a worker: as the OOM killer would
        os._exit(1)
    return image


def build():
    return v2.Compose([v2.Lambda(_die_in_a_worker)])
'''


@pytest.mark.slow
def test_a_dead_augmentation_worker_is_one_line(tiny_train_dir, tmp_path, run_flags, capsys):
    module = tmp_path / "killer.py"
    module.write_text(KILLER)
    code = run_cli(train.main, config.parse_args, run_flags(
        tiny_train_dir, tmp_path, "--augmentation", f"{module}:build", "--augment_workers", "1",
        "--epochs", "1"))
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "an augmentation worker process died" in err and "Traceback" not in err
