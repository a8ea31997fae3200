"""Train and inference must feed the model the same pixels for the same photo and config."""
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import inference
import train
from maskface import config, dataset, face, image_cache


def eval_copy_of_train_photos(train_dir, tmp_path, stem="normal"):
    """An eval folder whose images are byte copies of each person's <stem> photo."""
    eval_dir = tmp_path / "eval"
    (eval_dir / "images").mkdir(parents=True)
    sources = sorted(train_dir.glob(f"*/{stem}.jpg"))
    ids = [f"{p.parent.name}.jpg" for p in sources]
    for source, image_id in zip(sources, ids):
        shutil.copy2(source, eval_dir / "images" / image_id)
    pd.DataFrame({"ImageID": ids, "ans": 0}).to_csv(eval_dir / "info.csv", index=False)
    return eval_dir, sources


@pytest.mark.slow
@pytest.mark.parametrize("crop", ["face", "center", "none"])
def test_train_and_inference_use_the_same_pixels(tiny_train_dir, tmp_path, crop, run_flags):
    cache_dir = tmp_path / "cache"
    result = train.main(config.parse_args(run_flags(
        tiny_train_dir, tmp_path, "--cache_dir", str(cache_dir), "--resize", "48", "32",
        "--epochs", "1", "--crop", crop)))
    checkpoint = torch.load(result["run_dir"] / "best.pth", weights_only=False)
    preprocess = image_cache.Preprocess.from_dict(checkpoint["preprocess"])
    assert preprocess.crop == crop
    frame = dataset.parse_train_dir(tiny_train_dir)
    boxes = None
    if crop == "face":
        assert checkpoint["face"]["median_size"] is not None
        boxes, _ = face.crop_boxes_for_training(frame, preprocess, cache_dir)
    train_images = image_cache.build_cache(frame["path"].tolist(), preprocess, cache_dir, boxes=boxes)

    eval_dir, sources = eval_copy_of_train_photos(tiny_train_dir, tmp_path)
    out = inference.main(inference.parse_args([
        "--model_dir", str(result["run_dir"]), "--data_dir", str(eval_dir), "--output_dir",
        str(tmp_path / "out"), "--cache_dir", str(cache_dir)]))
    eval_images = out["caches"][0]
    rows = frame.reset_index().set_index("path").loc[[str(s) for s in sources], "index"].to_numpy()
    same = [np.array_equal(eval_images[i], train_images[row]) for i, row in enumerate(rows)]
    if crop != "face":
        assert all(same)
        return
    # a face crop is the same wherever train and test found the same own box; at inference a
    # photo stands alone, so only training photos that used their own detection must match
    train_table, _ = face.detect_boxes(frame["path"].tolist(), frame["profile"].tolist(),
                                       cache_dir / face.FACE_BOX_CACHE, progress=False)
    own = (train_table["fallback"].to_numpy()[rows] == "none")
    assert own.sum() >= len(rows) // 2, "the detector should find most unmasked synthetic faces"
    assert all(s for s, o in zip(same, own) if o)


def test_face_boxes_are_detected_once_and_shared(tiny_train_dir, tmp_path):
    frame = dataset.parse_train_dir(tiny_train_dir).head(21)
    pre = image_cache.Preprocess(resize=(48, 32), crop="face")
    said = []
    first, info = face.crop_boxes_for_training(frame, pre, tmp_path, say=said.append)
    assert said[0].startswith("face boxes: 21 photos detected now")
    again, _ = face.crop_boxes_for_training(frame, pre, tmp_path, say=said.append)
    assert said[2].startswith("face boxes: 0 photos detected now")
    assert np.array_equal(first, again)
    for x0, y0, x1, y1 in first:  # inside the 384 x 512 photo, with the run's aspect
        assert 0 <= x0 < x1 <= 384 and 0 <= y0 < y1 <= 512
        assert abs((y1 - y0) / (x1 - x0) - 48 / 32) < 0.02
    assert sum(info["fallbacks"].values()) == 21


@pytest.mark.slow
def test_face_cli_and_training_share_one_box_cache(tiny_train_dir, tmp_path, monkeypatch, capsys,
                                                   run_flags):
    monkeypatch.chdir(tmp_path)  # both defaults: face.py --cache and train.py --cache_dir
    assert face.main([str(tiny_train_dir), "--limit", "3"]) == 0
    assert "21 photos, 21 detected now" in capsys.readouterr().out
    assert (tmp_path / ".cache" / face.FACE_BOX_CACHE).is_file()
    flags = run_flags(tiny_train_dir, tmp_path, "--epochs", "1", "--crop", "face")
    flags[flags.index("--cache_dir") + 1] = ".cache"
    train.main(config.parse_args(flags))
    n_people = len(list(tiny_train_dir.iterdir()))
    assert f"face boxes: {(n_people - 3) * 7} photos detected now, 21 from the cache" \
        in capsys.readouterr().out
    assert face.main([str(tiny_train_dir)]) == 0  # and back: everything is cached now
    assert f"{n_people * 7} photos, 0 detected now" in capsys.readouterr().out
