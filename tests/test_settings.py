"""maskface.settings: model defaults and timm preprocessing, fixed input sizes, class weights
and names checked before any data is decoded."""
import re
from pathlib import Path

import pytest

import train
from maskface import (
    config,
)
from maskface.cli import UserError
from maskface.settings import model_defaults, model_normalization


@pytest.mark.parametrize("extra, expected", [
    (["--name", "a/b"], "--name 'a/b': expected a plain folder name"),
    (["--name", ".."], "--name '..'"),
    (["--drop_ages", "59-57"], "expected LO <= HI"),
    (["--model_dir", "{file}"], "is a file; expected a folder"),
    (["--cache_dir", "{file}/cache"], "is a file, not a folder"),
    (["--layer_decay", "0.7"], "--layer_decay 0.7: needs a timm model"),
    (["--normalize", "model"], "--normalize model: BaseModel has no timm pretrained_cfg"),
])
def test_bad_names_and_paths_rejected_before_any_work(extra, expected, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    extra = [e.replace("{file}", str(a_file)) for e in extra]
    args = config.parse_args(["--data_dir", str(tmp_path / "nowhere"), "--model_dir",
                             str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "c"), *extra])
    with pytest.raises(UserError, match=re.escape(expected)):
        train.main(args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_a_model_of_fixed_input_size_names_it_before_data_loads(tmp_path):
    args = config.parse_args(["--model", "vit_tiny_patch16_224", "--resize", "128", "96",
                             "--data_dir", str(tmp_path / "nowhere")])
    with pytest.raises(UserError, match=r"^--resize 128 96: vit_tiny_patch16_224 takes only "
                                        r"224x224 inputs; pass --resize 224 224$"):
        train.main(args)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------- issue 15
def test_class_weights_with_a_class_missing_from_training_say_so_before_decoding(tiny_train_dir,
                                                                                 tmp_path):
    # the tiny sample has no man of 60 or more
    flags = ["--data_dir", str(tiny_train_dir), "--model_dir", str(tmp_path / "runs"),
             "--cache_dir", str(tmp_path / "cache"), "--class_weights", "balanced"]
    with pytest.raises(UserError, match=r"^--class_weights balanced: class\(es\) 02 wear-male-60\+, "
                                        r"08 incorrect-male-60\+, 14 not_wear-male-60\+ have no "
                                        r"training photo"):
        train.main(config.parse_args(flags))
    with pytest.raises(UserError, match=r"^fold 0: --class_weights effective: class\(es\) 2 60\+"):
        train.main(config.parse_args(flags + ["--class_weights", "effective", "--category", "age",
                                             "--kfold", "2", "--old_age", "95"]))
    assert not any(tmp_path.iterdir())  # no cache decoded, no run folder made


def test_timm_model_brings_its_own_preprocessing_unless_overridden(tmp_path):
    weights = str(tmp_path / "w.pth")  # model_defaults only reads the flags

    def resolved(*flags):
        return model_defaults(config.parse_args(list(flags)))
    toolkit = {"resize": [128, 96], "normalize": "imagenet", "interpolation": "area"}
    assert resolved() == toolkit
    assert resolved("--model", "test_resnet") == toolkit  # no pretrained weights: nothing to match
    assert resolved("--model", "resnet18", "--weights", weights) == toolkit  # torchvision's
    # test_resnet's pretrained_cfg: 160x160, mean = std = 0.5, bilinear
    assert resolved("--model", "test_resnet", "--weights", weights) == {
        "resize": [160, 160], "normalize": "model", "interpolation": "bilinear"}
    assert resolved("--model", "timm/resnet18", "--pretrained")["interpolation"] == "bicubic"
    # a ViT takes one size: it gets it even without weights
    assert resolved("--model", "test_vit")["resize"] == [160, 160]
    assert resolved("--model", "test_vit", "--pretrained", "--resize", "160", "160",
                    "--normalize", "imagenet", "--interpolation", "area") == {
        "resize": [160, 160], "normalize": "imagenet", "interpolation": "area"}
    assert model_normalization("test_vit") == ([0.5] * 3, [0.5] * 3)


# ---------------------------------------------------------------------------- issue 24
def test_pretrained_weights_missing_offline_refused_before_any_photo_is_decoded(
        tiny_train_dir, tmp_path, monkeypatch, run_flags):
    import huggingface_hub.constants as hf_constants

    from maskface import image_cache

    def spy(path):
        raise AssertionError(f"decoded {path} before the weights were checked")
    monkeypatch.setattr(image_cache, "decode_image", spy)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    args = config.parse_args(run_flags(tiny_train_dir, tmp_path / "out", "--model", "lcnet_050",
                                       "--pretrained"))
    with pytest.raises(UserError, match=r"^--pretrained: lcnet_050's weights are not on this "
                                        r"machine .* or " + re.escape(
                                            str(tmp_path / "torch" / "hub" / "checkpoints" /
                                                "lcnet_050-f447553b.pth"))):
        train.main(args)
    assert not (tmp_path / "out").exists() and not (tmp_path / "shared-cache").exists()
    # a --weights file that is no state dict: refused as early
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not torch")
    args = config.parse_args(run_flags(tiny_train_dir, tmp_path / "out", "--model", "lcnet_050",
                                       "--weights", str(bad)))
    with pytest.raises(UserError, match=f"^weights file {re.escape(str(bad))}: unreadable"):
        train.main(args)


def test_crop_size_means_a_centre_crop_and_mean_std_override_normalize():
    import numpy as np

    from maskface import training
    from maskface.settings import resolve_settings

    args = config.parse_args(["--crop_size", "320", "256", "--augmentation", "BaseAugmentation",
                              "--resize", "224", "224", "--normalize", "dataset",
                              "--mean", "0.548", "0.504", "0.479"])
    settings = resolve_settings(args, say=lambda _: None)
    assert (settings.preprocess.crop, settings.preprocess.crop_size) == ("center", (320, 256))
    images = np.full((2, 4, 4, 3), 255, dtype=np.uint8)  # the dataset's own std: 0 per channel
    mean, std = training.normalization(settings, images, np.arange(2))
    assert (mean, std) == ([0.548, 0.504, 0.479], [0.0, 0.0, 0.0])  # --std not given: dataset's
    settings = resolve_settings(config.parse_args(["--std", "0.237", "0.247", "0.246"]),
                                say=lambda _: None)
    assert settings.preprocess.crop_size is None
    assert training.normalization(settings, images, np.arange(2)) == (
        [0.485, 0.456, 0.406], [0.237, 0.247, 0.246])  # ImageNet's mean, the given std


@pytest.mark.parametrize("extra, expected", [
    (["--model_args", '{"width": 8}'], "--model_args {\"width\": 8}: only for a --model "
                                       "module:function network; BaseModel takes none"),
    (["--model", "{example}:build", "--pretrained"], "--model {example}:build: a module:function "
                                                      "network returns its own logits; drop "
                                                      "--pretrained"),
    (["--model", "{example}:build", "--criterion", "arcface"], "drop --criterion arcface"),
    (["--model", "{example}:build", "--drop_rate", "0.2"], "drop --drop_rate"),
    (["--model", "{example}:build", "--model_args", '{"depth": 3}'],
     "--model {example}:build: build(num_classes=18, depth=3) failed (TypeError"),
    (["--model", "{example}:nothing"], "--model: {example} has no function 'nothing'"),
])
def test_a_bad_module_function_model_is_refused_before_any_photo_is_decoded(
        extra, expected, tiny_train_dir, tmp_path, monkeypatch, run_flags):
    from maskface import image_cache

    example = str(Path(__file__).resolve().parents[1] / "examples" / "my_model.py")
    monkeypatch.setattr(image_cache, "decode_image", lambda path: pytest.fail("decoded " + path))
    extra = [e.replace("{example}", example) for e in extra]
    args = config.parse_args(run_flags(tiny_train_dir, tmp_path / "out", *extra))
    with pytest.raises(UserError) as caught:
        train.main(args)
    message = str(caught.value)
    assert message.startswith("--model") and "\n" not in message
    assert expected.replace("{example}", example) in message
    assert not any(tmp_path.iterdir())
