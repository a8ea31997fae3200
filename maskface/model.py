"""Model registry (a small CPU-friendly CNN, torchvision classifiers, any timm model), local
weights, per-part learning rates, and a trained model rebuilt from its checkpoint (checkpoint.py
reads and writes the files). Add a model here: build_model is the one place models are made.

Every model that build_model returns has the same shape: ``edge_mix`` (Canny runs only) ->
``backbone`` (pooled features) -> ``dropout`` -> ``heads`` (one linear or cosine head, or three
for multi-head runs, whose logits are concatenated). One layout keeps weight loading, checkpoints
and per-part learning rates the same for every architecture.
"""
from __future__ import annotations

import difflib
import functools
import json
import socket
import urllib.parse
from pathlib import Path
from typing import Callable

import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from maskface import labels
from maskface.cli import UserError
from maskface.files import error_reason, file_sha256, import_user_module
from maskface.labels import HEAD_SIZES, NUM_CLASSES

# They win over timm models of the same name; "timm/<name>" reaches timm's, "tv_<name>" any other
# torchvision classifier.
TORCHVISION_MODELS: dict[str, Callable[..., nn.Module]] = {
    "mobilenet_v2": torchvision.models.mobilenet_v2,
    "mobilenet_v3_large": torchvision.models.mobilenet_v3_large,
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "efficientnet_b0": torchvision.models.efficientnet_b0,
}
TORCHVISION_PREFIX = "tv_"
TIMM_PREFIX = "timm/"
HUB_PREFIXES = ("hf-hub:", "hf_hub:")  # timm's own prefixes for a Hugging Face hub repo id
# auxiliary heads would make forward return tuples in train mode
_TORCHVISION_KWARGS = {"inception_v3": {"aux_logits": False, "init_weights": True},
                       "googlenet": {"aux_logits": False, "init_weights": True}}
MODEL_NAMES = ["BaseModel", *TORCHVISION_MODELS]  # plus tv_<name> and every timm name
MODEL_HELP = ("BaseModel; a torchvision model (" + ", ".join(TORCHVISION_MODELS)
              + ": these bare names mean torchvision's; tv_<name> for any other torchvision "
                "classifier); a timm name (timm.list_models(), e.g. convnext_atto or "
                "resnet18.a1_in1k with its pretrained tag; timm/<name> for timm's where a "
                "torchvision model has the same name); or hf-hub:<org>/<repo> for a timm model "
                "on the Hugging Face hub (offline: HF_HUB_OFFLINE=1 with a local hub cache); "
                "or module:function, your own network (module: a .py path or an importable "
                "module; function(num_classes, **--model_args) returns an nn.Module of logits)")


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def _pool() -> nn.MaxPool2d:
    # ceil_mode keeps a 1-pixel map at 1 pixel, so inputs below 32 px (e.g. 32x24) still work
    return nn.MaxPool2d(2, ceil_mode=True)


class BaseModel(nn.Module):
    """Small CNN that trains in minutes on a CPU at 128x96; any input size works (1/32 at the end).

    Two stride-2 convs bring the image to 1/4 size before any wide layer, because full-resolution
    activations (and their BatchNorm) dominate CPU time; three conv+pool blocks reach 1/32.
    """

    def __init__(self, num_classes: int, drop_rate: float = 0.2, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, 16, stride=2),
            _conv_bn_relu(16, 32, stride=2),
            _conv_bn_relu(32, 48), _pool(),
            _conv_bn_relu(48, 96), _pool(),
            _conv_bn_relu(96, 128), _pool(),
            _conv_bn_relu(128, 128),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.num_features = 128
        self.dropout = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(self.num_features, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.features(images)))


class CosineClassifier(nn.Module):
    """scale * cos(angle between features and each class weight): the arcface model head."""

    def __init__(self, in_features: int, num_classes: int, scale: float = 30.0) -> None:
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        cos = F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))
        return cos.clamp(-1, 1) * self.scale  # rounding can leave |cos| a hair above 1


class ImageClassifier(nn.Module):
    """[edge_mix] -> backbone -> dropout -> heads; returns the heads' logits concatenated."""

    def __init__(self, backbone: nn.Module, num_features: int, head_sizes: tuple[int, ...], *,
                 drop_rate: float = 0.0, cosine_head: bool = False, cosine_scale: float = 30.0,
                 canny: bool = False) -> None:
        super().__init__()
        self.edge_mix: nn.Conv2d | None = None
        if canny:
            # starts as "pass RGB through, ignore edges" so RGB-pretrained backbones are not
            # disturbed; training learns how much edge signal to mix in
            self.edge_mix = nn.Conv2d(4, 3, kernel_size=1)
            with torch.no_grad():
                self.edge_mix.weight.zero_()
                self.edge_mix.weight[:, :3, 0, 0] = torch.eye(3)
                self.edge_mix.bias.zero_()
        self.backbone = backbone
        self.dropout = nn.Dropout(drop_rate)
        if cosine_head:
            self.heads = nn.ModuleList(CosineClassifier(num_features, n, cosine_scale)
                                       for n in head_sizes)
        else:
            self.heads = nn.ModuleList(nn.Linear(num_features, n) for n in head_sizes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.edge_mix is not None:
            images = self.edge_mix(images)
        features = self.dropout(self.backbone(images))
        return torch.cat([head(features) for head in self.heads], dim=1)


class UserClassifier(ImageClassifier):
    """[edge_mix] -> a --model module:function network, whose logits are the model's own: no
    dropout or heads of the toolkit's (``heads`` is empty, so per-part learning rates see the
    network as the backbone)."""

    def __init__(self, network: nn.Module, canny: bool = False) -> None:
        super().__init__(network, 0, (), canny=canny)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.edge_mix is not None:
            images = self.edge_mix(images)
        return self.backbone(images)


def is_user_model(name: str) -> bool:
    """Whether --model names the user's own network as module:function (timm and torchvision
    names never hold a colon; hf-hub: is timm's)."""
    return ":" in name and not name.startswith(HUB_PREFIXES)


def resolved_model_value(name: str) -> str:
    """The --model value a run records: a module:function's .py file made absolute, so a replay
    or inference from another folder imports the same file; every other name as given."""
    if not is_user_model(name):
        return name
    module, _, function = name.rpartition(":")
    if module.endswith(".py") or Path(module).is_file():
        return f"{Path(module).resolve()}:{function}"
    return name


def user_model_function(name: str) -> tuple[Callable[..., nn.Module], str | None]:
    """(the function, the sha256 of its module's file) of --model module:function; UserError
    naming the value when the module does not import or has no such function."""
    module_name, _, function_name = name.rpartition(":")
    where = f"--model {name}"
    if not module_name or not function_name:
        raise UserError(f"{where}: expected module:function (a .py path or an importable module, "
                        "then the function's name)")
    module, source = import_user_module(module_name, where, "maskface_model_")
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(f"{where}: {module_name} has no function '{function_name}'")
    return function, file_sha256(source) if source else None


def model_args_of(text: str | None) -> dict:
    """--model_args JSON -> the keyword arguments of a module:function model; UserError unless
    a JSON object."""
    if not text:
        return {}
    try:
        values = json.loads(text)
    except json.JSONDecodeError as why:
        raise UserError(f"--model_args {text}: not JSON ({why.msg} at character {why.pos}); "
                        "expected an object, e.g. '{\"width\": 32}'") from None
    if not isinstance(values, dict):
        raise UserError(f"--model_args {text}: expected a JSON object of keyword arguments, "
                        "e.g. '{\"width\": 32}'")
    return values


def _user_network(name: str, num_outputs: int, model_args: dict | None,
                  source_sha256: str | None) -> tuple[nn.Module, str | None]:
    function, sha256 = user_model_function(name)
    if source_sha256 and sha256 != source_sha256:
        # the weights would load into changed code: a wrong score with exit 0, so refuse
        raise UserError(f"--model {name}: the module changed since the model was trained (sha256 "
                        f"{source_sha256[:12]}... then, {(sha256 or 'none')[:12]}... now); "
                        "restore the file the run trained with")
    where = f"--model {name}"
    try:
        network = function(num_classes=num_outputs, **(model_args or {}))
    except Exception as why:  # the user's code: name it and what it was given
        raise UserError(f"{where}: {name.rpartition(':')[2]}(num_classes={num_outputs}"
                        + "".join(f", {k}={v!r}" for k, v in (model_args or {}).items())
                        + f") failed ({error_reason(why)})") from None
    if not isinstance(network, nn.Module):
        raise UserError(f"{where}: returns a {type(network).__name__}; expected a torch "
                        "nn.Module that maps [B, 3, H, W] images to [B, num_classes] logits")
    return network, sha256


def check_user_model(name: str, num_outputs: int, model_args: dict | None,
                     size: tuple[int, int]) -> None:
    """Build a module:function model and run it on two dummy images of ``size`` before any photo
    is decoded: UserError unless it returns [2, num_outputs] logits."""
    network, _ = _user_network(name, num_outputs, model_args, None)
    dummy = torch.zeros(2, 3, *size)
    network.eval()
    try:
        with torch.no_grad():
            out = network(dummy)
    except Exception as why:
        raise UserError(f"--model {name}: fails on a [2, 3, {size[0]}, {size[1]}] batch "
                        f"({error_reason(why)})") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_outputs):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"--model {name}: returns {got} for a [2, 3, {size[0]}, {size[1]}] batch; "
                        f"expected [2, {num_outputs}] logits")


def _resolve(name: str) -> tuple[str, str]:
    """name -> (family, name inside that family); unknown names raise ValueError."""
    if name == "BaseModel":
        return "base", name
    if name.startswith(HUB_PREFIXES):
        return "hub", name.split(":", 1)[1]
    if is_user_model(name):
        return "user", name
    if name in TORCHVISION_MODELS:
        return "torchvision", name
    if name.startswith(TORCHVISION_PREFIX) and name[len(TORCHVISION_PREFIX):] in _torchvision_names():
        return "torchvision", name[len(TORCHVISION_PREFIX):]
    timm_name = name[len(TIMM_PREFIX):] if name.startswith(TIMM_PREFIX) else name
    if timm.is_model(timm_name):
        return "timm", timm_name
    known = list(dict.fromkeys([*MODEL_NAMES, *(TORCHVISION_PREFIX + n for n in _torchvision_names()),
                                *timm.list_models()]))
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    raise ValueError(f"unknown model {name!r}; choose {MODEL_HELP}; close matches: "
                     + (", ".join(close) if close else "none"))


def _torchvision_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def validate_model_name(name: str) -> None:
    """Raise ValueError for a name build_model would reject, without building anything (a hub
    name's config is read: from the local cache, or downloaded)."""
    family, inner_name = _resolve(name)
    if family == "hub":
        hub_config(inner_name)
    if family == "user":
        try:
            user_model_function(name)
        except UserError as why:
            raise ValueError(str(why).removeprefix(f"--model {name}: ")) from None


def is_timm(name: str) -> bool:
    """Whether ``name`` builds a timm model (a timm name or a hub repo)."""
    return _resolve(name)[0] in ("timm", "hub")


def timm_pretrained_cfg(name: str) -> dict | None:
    """timm's pretrained_cfg of a model name (mean, std, input_size, interpolation,
    fixed_input_size, ...): its default or tagged weights', or a hub repo's config.json; None for
    other models and timm names without one. Known without building the model."""
    family, inner_name = _resolve(name)
    if family == "hub":
        return dict(hub_config(inner_name)[0])
    if family != "timm":
        return None
    cfg = timm.models.get_pretrained_cfg(inner_name)
    return None if cfg is None else cfg.to_dict()


def model_family(name: str) -> str:
    """'base' (BaseModel), 'torchvision' or 'timm': where ``name``'s architecture comes from;
    ValueError for an unknown name."""
    return _resolve(name)[0]


def fixed_input_size(name: str) -> tuple[int, int] | None:
    """(H, W) that a timm model accepts and nothing else (ViT, Swin: its pretrained_cfg says
    fixed_input_size), else None; known without building the model."""
    cfg = timm_pretrained_cfg(name)
    if cfg is None or not cfg.get("fixed_input_size"):
        return None
    return int(cfg["input_size"][1]), int(cfg["input_size"][2])


@functools.lru_cache(maxsize=None)
def hub_config(hub_id: str) -> tuple[dict, str, dict]:
    """(pretrained_cfg, timm architecture, model arguments) of a timm model on the Hugging Face
    hub, read once per process (``hub_config.cache_clear()`` forgets what was read, as after a
    change of the hub cache or of HF_HUB_OFFLINE); UserError when neither the hub nor the local
    cache has it."""
    import huggingface_hub.constants as hf_constants
    from timm.models import load_model_config_from_hf

    host = urllib.parse.urlparse(hf_constants.ENDPOINT).hostname or ""
    if not hf_constants.HF_HUB_OFFLINE and not _reachable(host):  # fail fast, no minute of retries
        raise UserError(f"hf-hub:{hub_id}: the Hugging Face hub ({host}) is unreachable; for a "
                        "model in the local hub cache set HF_HUB_OFFLINE=1")
    try:
        return load_model_config_from_hf(hub_id)
    except Exception as error:  # hub and cache errors come in many types
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"hf-hub:{hub_id}: no timm config.json on the hub or in the local cache "
                        f"({reason})") from None


def _strip_torchvision_head(net: nn.Module, name: str) -> int:
    """Replace the classifier of a torchvision model by Identity; returns the feature width."""
    linears = [(path, m) for path, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"torchvision model {name!r} has no linear classifier to replace")
    path, linear = linears[-1]
    parent_path, _, child = path.rpartition(".")
    parent = net.get_submodule(parent_path)
    if parent_path and isinstance(parent, nn.Sequential) and all(
            isinstance(m, (nn.Dropout, nn.Linear)) for m in parent):
        # a dropout+linear head goes whole, so the wrapper's drop_rate is the only dropout
        parent_path, _, child = parent_path.rpartition(".")
        parent = net.get_submodule(parent_path)
    setattr(parent, child, nn.Identity())
    return linear.in_features


def _pretrained_host(timm_name: str) -> str | None:
    """Host timm would download ``timm_name``'s weights from (None: it has no pretrained weights)."""
    import huggingface_hub.constants as hf_constants

    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        return None
    url = hf_constants.ENDPOINT if cfg.hf_hub_id else (cfg.url or "")
    return urllib.parse.urlparse(url).hostname or ""


def _reachable(host: str, timeout_s: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm asks the hub for, in order


def _pretrained_cfg_of(name: str) -> dict | None:
    """timm's pretrained_cfg for a timm name or an hf-hub: repo (whose config.json names it)."""
    if name.startswith(HUB_PREFIXES):
        return dict(hub_config(name.split(":", 1)[1])[0])
    cfg = timm.models.get_pretrained_cfg(name)
    return None if cfg is None else cfg.to_dict()


def pretrained_files(name: str) -> tuple[str | None, list[str]]:
    """(the local file timm's pretrained weights for ``name`` would be read from, or None; every
    file that would satisfy --pretrained offline), as timm 1.0 resolves them without a download:
    the pretrained_cfg's own ``file``; in the Hugging Face hub cache ($HF_HOME/hub, by
    huggingface_hub's rules) the ``hf_hub_id`` repo's model.safetensors or pytorch_model.bin (or
    its hf_hub_filename); in torch's hub cache ($TORCH_HOME/hub/checkpoints) the basename of the
    ``url``. Nothing is downloaded; a timm name without weights gives (None, [])."""
    import huggingface_hub
    import huggingface_hub.constants as hf_constants
    from timm.models._hub import hf_split

    cfg = _pretrained_cfg_of(name)
    if not cfg:
        return None, []
    found, wanted = [], []
    if cfg.get("file"):
        wanted.append(str(cfg["file"]))
        found += [str(cfg["file"])] if Path(cfg["file"]).is_file() else []
    if cfg.get("hf_hub_id"):
        repo, revision = hf_split(cfg["hf_hub_id"])
        hub_cache = Path(hf_constants.HF_HUB_CACHE)
        folder = hub_cache / f"models--{repo.replace('/', '--')}"
        commit = revision or "main"
        ref = folder / "refs" / commit
        if ref.is_file():  # the snapshot folder is named by the commit the ref points at
            commit = ref.read_text().strip()
        elif not revision:
            commit = "<commit>"
        for filename in ([cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename")
                         else HF_WEIGHT_FILES):
            wanted.append(str(folder / "snapshots" / commit / filename))
            cached = huggingface_hub.try_to_load_from_cache(repo, filename, cache_dir=hub_cache,
                                                            revision=revision)
            found += [cached] if isinstance(cached, str) and Path(cached).is_file() else []
    if cfg.get("url"):
        target = Path(torch.hub.get_dir()) / "checkpoints" / Path(
            urllib.parse.urlparse(cfg["url"]).path).name
        wanted.append(str(target))
        found += [str(target)] if target.is_file() else []
    return (found[0] if found else None), wanted


def torchvision_pretrained_file(name: str) -> str:
    """The file ``name``'s ImageNet weights are read from: torchvision's own file in torch's hub
    cache ($TORCH_HOME/hub/checkpoints, named as its download), the default weights' first, then
    the model's other weights (e.g. mobilenet_v2's V1 file); else a UserError naming those exact
    paths, where they come from, and the other ways."""
    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError, AttributeError):
        enum = None
    if enum is None or not len(enum):
        raise UserError(f"--pretrained: torchvision has no pretrained weights for {name!r}; drop "
                        "--pretrained or pass --weights FILE")
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    choices = [enum.DEFAULT, *(w for w in enum if w != enum.DEFAULT)]
    files = [cache / Path(urllib.parse.urlparse(w.url).path).name for w in choices]
    found = next((f for f in files if f.is_file()), None)
    if found is None:
        timm_name = f"{TIMM_PREFIX}{name}" if timm.is_model(name) else None
        raise UserError(
            f"--pretrained: torchvision's {name} weights are not on this machine and are never "
            "downloaded here; any of these files satisfies it: "
            + " or ".join(f"{f} ({w}, from {w.url})" for f, w in zip(files, choices))
            + (f"; --model {timm_name} --pretrained reads timm's weights from its caches"
               if timm_name else "") + "; or pass --weights FILE with a local state dict")
    return str(found)


def check_pretrained(name: str) -> str | None:
    """--pretrained checked before any photo is decoded: the local file the weights will be read
    from, None when they will be downloaded (the host answers), else a UserError naming every
    file that would satisfy it offline and --weights FILE."""
    family, inner_name = _resolve(name)
    if family == "base":
        _build_backbone(family, inner_name, pretrained=True)  # raises: it has none
    if family == "torchvision":
        local = torchvision_pretrained_file(inner_name)
        _check_readable(local)
        return local
    if family == "user":
        check_user_model_flags(name, pretrained=True, cosine_head=False, drop_rate=0.0)
    import huggingface_hub.constants as hf_constants

    local, wanted = pretrained_files(name if family == "hub" else inner_name)
    if not wanted:
        raise UserError(f"--pretrained: timm has no pretrained weights for {name!r}; drop "
                        "--pretrained or pass --weights FILE")
    if local is not None:
        _check_readable(local)
        return local
    cfg = _pretrained_cfg_of(name if family == "hub" else inner_name)
    host = urllib.parse.urlparse(hf_constants.ENDPOINT if cfg.get("hf_hub_id")
                                 else cfg.get("url") or "").hostname
    why = ("HF_HUB_OFFLINE=1" if hf_constants.HF_HUB_OFFLINE
           else f"{host} is unreachable" if not host or not _reachable(host) else None)
    if why is None:
        return None
    fill = (f" (`huggingface-cli download {cfg['hf_hub_id']}` fills the hub cache)"
            if cfg.get("hf_hub_id") else f" (downloaded from {cfg['url']})" if cfg.get("url")
            else "")
    raise UserError(f"--pretrained: {name}'s weights are not on this machine and cannot be "
                    f"downloaded ({why}); any of these files satisfies it: " + " or ".join(wanted)
                    + f"{fill}; or pass --weights FILE with a local state dict")


def _check_readable(path: str) -> None:
    """A cached weights file is whole enough to load (mapped, weights_only), or a UserError."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(path, "pt") as f:
                f.keys()
        else:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as why:  # truncated downloads and foreign files raise many types
        raise UserError(f"--pretrained: cached weights {path} are unreadable "
                        f"({type(why).__name__}); delete the file, or pass --weights FILE") from None


def _timm_backbone(timm_name: str, pretrained: bool, timm_kwargs: dict | None = None) -> nn.Module:
    if not pretrained:
        return timm.create_model(timm_name, num_classes=0, **(timm_kwargs or {}))
    local, _ = pretrained_files(timm_name)
    if local is not None:  # read from the file found, so no hub request (or its retries) at all
        return timm.create_model(timm_name, pretrained=True, num_classes=0,
                                 pretrained_cfg_overlay={"file": local, "source": "timm"},
                                 **(timm_kwargs or {}))
    import huggingface_hub.constants as hf_constants

    offline_msg = (f"cannot download pretrained weights for {timm_name!r} (no internet?); "
                   "pass --weights FILE with a local state dict instead, or set "
                   "HF_HUB_OFFLINE=1 when they are in the local Hugging Face cache")
    host = (urllib.parse.urlparse(hf_constants.ENDPOINT).hostname or ""
            if timm_name.startswith(HUB_PREFIXES) else _pretrained_host(timm_name))
    if host is None:
        raise UserError(f"timm has no pretrained weights for {timm_name!r}; "
                        "drop --pretrained or pass --weights FILE")
    # hub downloads retry for about a minute when offline; a 3 s probe fails fast instead.
    # HF_HUB_OFFLINE=1 means the user wants the local hub cache, which needs no network.
    if not hf_constants.HF_HUB_OFFLINE and not _reachable(host):
        raise UserError(offline_msg)
    try:
        return timm.create_model(timm_name, pretrained=True, num_classes=0, **(timm_kwargs or {}))
    except Exception as error:  # network and hub errors come in many types
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{offline_msg} ({reason})") from error


def _build_backbone(family: str, name: str, pretrained: bool,
                    timm_kwargs: dict | None = None) -> tuple[nn.Module, int]:
    if family == "base":
        if pretrained:
            raise UserError("BaseModel has no pretrained weights; drop --pretrained")
        backbone = BaseModel(num_classes=1, drop_rate=0.0)
        backbone.classifier = nn.Identity()
        return backbone, backbone.num_features
    if family == "torchvision":
        builder = TORCHVISION_MODELS.get(name) or torchvision.models.get_model_builder(name)
        backbone = builder(weights=None, **_TORCHVISION_KWARGS.get(name, {}))
        if pretrained:  # read from torch's hub cache as torchvision would, never downloaded
            backbone.load_state_dict(torch.load(torchvision_pretrained_file(name),
                                                map_location="cpu", weights_only=True))
        return backbone, _strip_torchvision_head(backbone, name)
    backbone = _timm_backbone(name, pretrained, timm_kwargs)
    # models with a pre-logits layer (mobilenetv3's conv_head) output head_hidden_size features
    return backbone, getattr(backbone, "head_hidden_size", None) or backbone.num_features


def build_model(name: str, num_classes: int, *, multi_head: bool = False, canny: bool = False,
                cosine_head: bool = False, cosine_scale: float = 30.0, pretrained: bool = False,
                weights: str | None = None, drop_rate: float = 0.0,
                timm_kwargs: dict | None = None, model_args: dict | None = None,
                source_sha256: str | None = None) -> nn.Module:
    """Build a classifier returning logits [B, num_classes], or [B, 8] (mask, gender, age) heads.

    ``model.model_config`` holds every argument needed to rebuild it with build_model(**config);
    a hub model's records the timm architecture and arguments its config.json named, so it is
    rebuilt without the hub.
    """
    family, inner_name = _resolve(name)
    if multi_head and num_classes != NUM_CLASSES:
        raise ValueError(f"multi_head predicts all {NUM_CLASSES} classes; got num_classes={num_classes}")
    if family == "user":
        return _build_user_model(name, num_classes, multi_head=multi_head, canny=canny,
                                 cosine_head=cosine_head, pretrained=pretrained, weights=weights,
                                 drop_rate=drop_rate, model_args=model_args,
                                 source_sha256=source_sha256)
    if family == "hub":  # recorded (and rebuilt) as timm/<architecture> with the repo's arguments
        _, architecture, hub_args = hub_config(inner_name)
        timm_kwargs = {k: v for k, v in (hub_args or {}).items() if k != "num_classes"}
        family, inner_name = "timm", name if pretrained else architecture  # weights: the hub's
        name = TIMM_PREFIX + architecture
    backbone, num_features = _build_backbone(family, inner_name, pretrained, timm_kwargs)
    head_sizes = HEAD_SIZES if multi_head else (num_classes,)
    net = ImageClassifier(backbone, num_features, head_sizes, drop_rate=drop_rate,
                          cosine_head=cosine_head, cosine_scale=cosine_scale, canny=canny)
    net.model_config = {"name": name, "num_classes": num_classes, "multi_head": multi_head,
                        "canny": canny, "cosine_head": cosine_head, "drop_rate": drop_rate}
    if timm_kwargs:
        net.model_config["timm_kwargs"] = dict(timm_kwargs)
    if cosine_head:  # the arcface loss reads cosines back as logits / scale: both must agree
        net.model_config["cosine_scale"] = cosine_scale
    if weights:
        load_weights(net, weights)
    return net


def check_user_model_flags(name: str, *, pretrained: bool, cosine_head: bool,
                           drop_rate: float) -> None:
    """What a module:function network cannot take, since it returns its own logits."""
    for given, flag in ((pretrained, "--pretrained (load weights in your function, or pass "
                                     "--weights FILE)"),
                        (cosine_head, "--criterion arcface (it needs the toolkit's cosine head)"),
                        (drop_rate, "--drop_rate (put dropout in your network)")):
        if given:
            raise UserError(f"--model {name}: a module:function network returns its own logits; "
                            f"drop {flag}")


def _build_user_model(name: str, num_classes: int, *, multi_head: bool, canny: bool,
                      cosine_head: bool, pretrained: bool, weights: str | None, drop_rate: float,
                      model_args: dict | None, source_sha256: str | None) -> nn.Module:
    """A module:function network in the toolkit's shape; its model_config records the function's
    arguments and its module's sha256, so a checkpoint rebuilds it by the same import, or refuses
    when the file changed."""
    check_user_model_flags(name, pretrained=pretrained, cosine_head=cosine_head,
                           drop_rate=drop_rate)
    outputs = sum(HEAD_SIZES) if multi_head else num_classes
    network, sha256 = _user_network(name, outputs, model_args, source_sha256)
    net = UserClassifier(network, canny=canny)
    net.model_config = {"name": name, "num_classes": num_classes, "multi_head": multi_head,
                        "canny": canny, "cosine_head": False, "drop_rate": 0.0,
                        "model_args": dict(model_args or {}), "source_sha256": sha256}
    if weights:
        load_weights(net, weights)
    return net


def parameter_groups(net: nn.Module, lr: float, weight_decay: float, *, head_lr_mult: float = 1.0,
                     layer_decay: float | None = None) -> list[dict]:
    """Optimizer parameter groups of a build_model network: the backbone at ``lr`` (timm's
    layer-wise decay with ``layer_decay``: lr x layer_decay^(depth from the top), no weight decay
    on 1-D tensors, as timm does), then the new layers (heads, and the Canny mix layer) at
    ``lr * head_lr_mult``. Each group's lr is final (no lr_scale key), so torch's and timm's
    schedulers alike scale every group in proportion."""
    if head_lr_mult == 1 and layer_decay is None:  # one group, as checkpoints before groups hold
        return [{"params": list(net.parameters()), "lr": lr, "weight_decay": weight_decay}]
    new_layers = [p for part in (net.edge_mix, net.heads) if part is not None
                  for p in part.parameters()]
    if layer_decay is None:
        groups = [{"params": list(net.backbone.parameters()), "lr": lr,
                   "weight_decay": weight_decay}]
    else:
        if not hasattr(net.backbone, "group_matcher"):
            raise UserError("--layer_decay needs a timm model (it uses the model's group_matcher)")
        from timm.optim import param_groups_layer_decay
        groups = param_groups_layer_decay(net.backbone, weight_decay=weight_decay,
                                          layer_decay=layer_decay)
        for group in groups:
            group["lr"] = lr * group.pop("lr_scale", 1.0)
    groups.append({"params": new_layers, "lr": lr * head_lr_mult, "weight_decay": weight_decay})
    return [g for g in groups if g["params"]]


def multi_head_class_probs(logits: torch.Tensor) -> torch.Tensor:
    """Multi-head logits [..., 8] -> 18-class probabilities: the product of the head softmaxes."""
    mask, gender, age = torch.split(logits, HEAD_SIZES, dim=-1)
    return labels.heads_to_class_probs(mask.softmax(-1), gender.softmax(-1), age.softmax(-1))


def class_probabilities(model_config: dict, logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities of a model's logits; multi-head logits must not be summed or softmaxed whole."""
    if model_config.get("multi_head"):
        return multi_head_class_probs(logits)
    return F.softmax(logits, dim=-1)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The name -> tensor dict of a local weights file (torch.save or .safetensors), or a
    UserError naming the file and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            saved = load_file(str(path))
        else:
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for truncated or foreign files
        raise UserError(f"weights file {path}: unreadable ({type(error).__name__}); expected a "
                        "state dict saved by torch.save, or a .safetensors file") from None
    if isinstance(saved, dict):
        for key in ("model", "state_dict"):
            if isinstance(saved.get(key), dict):
                saved = saved[key]
                break
    if not isinstance(saved, dict) or not saved or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in saved.items()):
        raise UserError(f"weights file {path}: expected a state dict (name -> tensor), "
                        "or a dict holding one under 'model' or 'state_dict'")
    return _strip_wrapper_prefixes(saved)


def _strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DataParallel and torch.compile add these prefixes when their state dict is saved
    for prefix in ("module.", "_orig_mod."):
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str | Path) -> tuple[int, list[str]]:
    """Copy every tensor of a local state dict whose name and shape fit; returns (loaded, skipped).

    The file may hold a whole model of this kind (e.g. a checkpoint) or a plain backbone (e.g.
    torchvision's ImageNet mobilenet_v2): names are matched against the model and against its
    backbone, and whichever fits more tensors is used. Heads of another size are skipped.
    """
    path = Path(path)
    saved = read_state_dict(path)
    targets = [model]
    if isinstance(getattr(model, "backbone", None), nn.Module):
        targets.append(model.backbone)

    def fitting(target: nn.Module) -> dict[str, torch.Tensor]:
        own = target.state_dict()
        return {k: v for k, v in saved.items() if k in own and own[k].shape == v.shape}

    target = max(targets, key=lambda t: len(fitting(t)))  # max keeps the first on ties
    matched = fitting(target)
    if not matched:
        raise UserError(f"weights file {path}: no tensor matches the model by name and shape")
    own = target.state_dict()  # shares storage with the parameters, so copy_ loads in place
    with torch.no_grad():
        for key, tensor in matched.items():
            own[key].copy_(tensor)
    skipped = [k for k in saved if k not in matched]
    shown = ", ".join(skipped[:10]) + (f", ... ({len(skipped) - 10} more)" if len(skipped) > 10 else "")
    print(f"weights: loaded {len(matched)}/{len(saved)} tensors from {path}"
          + (f"; not loaded (shape/name mismatch): {shown}" if skipped else ""))
    return len(matched), skipped


def restore_model(checkpoint: dict) -> nn.Module:
    """Rebuild a trained model, in eval mode, from a checkpoint holding 'model_config' and 'model'."""
    if not isinstance(checkpoint, dict) or not {"model_config", "model"} <= set(checkpoint):
        raise UserError("checkpoint lacks 'model_config' or 'model' (not written by train.py?)")
    net = build_model(**checkpoint["model_config"])
    try:
        net.load_state_dict(_strip_wrapper_prefixes(checkpoint["model"]), strict=True)
    except RuntimeError as error:
        raise UserError(f"checkpoint weights do not fit its model_config "
                        f"{checkpoint['model_config']}: {str(error).splitlines()[0]}") from error
    return net.eval()
