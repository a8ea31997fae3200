"""How a model runs on its device: the autocast dtype (bf16, fp16 or none) and the memory format
(channels_last or not), decided in one place (choose_precision) for train.py, inference.py and
the benchmark, recorded in config.json and checkpoints so a resume and inference follow what the
model trained with.

--amp auto picks bf16 on CUDA, and on a CPU only where torch reports a native bf16 unit (AMX or
AVX-512 BF16) and the model's family was measured to gain from it; elsewhere bf16 is emulated
with fp32 instructions and runs about 10x slower than fp32, so auto stays fp32 there.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from maskface import model as models
from maskface.cli import UserError

AMP_MODES = ("auto", "bf16", "fp16", "off")
CHANNELS_LAST_MODES = ("auto", "on", "off")
AMP_NAMES = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Model families (model.model_family) whose CPU train step gets faster with bf16 autocast and
# channels_last where the CPU runs bf16 natively, measured as train-step images/s at 128x96,
# batch 64, 2 cores (fp32 -> bf16 -> bf16 + channels_last):
#   torchvision resnet18: 84 -> 131 -> 149 (1.8x), on a 2-core AMX / AVX-512 BF16 machine (issue 17)
# BaseModel and timm models have not been timed on such a CPU yet (issue 17's development machine
# was an AVX2-only AMD EPYC, where bf16 is emulated and every model trains ~10x slower in it), so
# --amp auto leaves them fp32 until `benchmark.py --amp bf16 --channels_last on` shows it pays.
# Accuracy: bf16-trained BaseModel, resnet18 and mobilenetv3_small_100 scored within the
# seed-to-seed spread of fp32 on the dev set (paired seeds, emulated bf16; docs/performance.md).
CPU_BF16_FAMILIES = {"torchvision": "resnet18 1.8x faster (84 -> 149 img/s at 128x96)"}
# channels_last (oneDNN's NHWC kernels; the batches already arrive NHWC from BatchAugmentation)
# pays on a CPU in fp32 too: train-step images per CPU-second at 128x96, one thread, windows
# alternating, on the AVX2 EPYC (NCHW -> NHWC): BaseModel 215 -> 250 (1.16x), timm
# mobilenetv3_small_100 94 -> 128 (1.36x), torchvision resnet18 20.9 -> 22.2 (1.06x). So auto
# turns it on for every CPU run; on CUDA only where autocast runs (fp32 there is unmeasured).


def cpu_bf16_unit() -> str | None:
    """The CPU's native bf16 unit as torch reports it ("AMX" or "AVX-512 BF16"), or None: no
    such unit, a torch without the probes (they moved between releases), or oneDNN without bf16.
    Without one, bf16 is emulated in fp32 instructions and runs far slower than fp32."""
    probes = (("AMX", "_is_amx_tile_supported"), ("AVX-512 BF16", "_is_avx512_bf16_supported"))
    try:
        if not (torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return None
        for unit, probe in probes:
            check = getattr(torch.cpu, probe, None)
            if check is not None and check():
                return unit
    except (AttributeError, RuntimeError):
        return None
    return None


@dataclass(frozen=True)
class Precision:
    """How a model runs on its device: autocast dtype (None = fp32), memory format, and why."""
    autocast_dtype: torch.dtype | None
    channels_last: bool
    reason: str = field(default="", compare=False)

    @property
    def amp(self) -> str:
        """The --amp value that gives this dtype again (config.json, checkpoints)."""
        return AMP_NAMES[self.autocast_dtype]

    def describe(self, why: bool = True) -> str:
        text = {None: "fp32", torch.bfloat16: "bf16 autocast",
                torch.float16: "fp16 autocast"}[self.autocast_dtype]
        text += " + channels_last" if self.channels_last else ""
        return text + (f" ({self.reason})" if self.reason and why else "")

    def record(self) -> dict:
        """What a checkpoint keeps: plain values, loadable with weights_only=True."""
        return {"amp": self.amp, "channels_last": self.channels_last}


def _cuda_dtype(mode: str) -> torch.dtype:
    if mode == "fp16":
        return torch.float16
    if not torch.cuda.is_bf16_supported():
        if mode == "bf16":
            raise UserError("--amp bf16: this GPU does not support bfloat16; use --amp fp16")
        return torch.float16
    return torch.bfloat16


def choose_precision(amp: str, channels_last: str | bool, device: torch.device,
                     model_name: str | None = None) -> Precision:
    """--amp and --channels_last for ``model_name`` on ``device``: the one place 'auto' is decided.

    auto: bf16 autocast on CUDA (fp16 where the GPU lacks bf16); on a CPU, bf16 only where the CPU
    runs it natively (cpu_bf16_unit) and the model's family is one where it was measured to pay
    (CPU_BF16_FAMILIES), fp32 elsewhere. channels_last auto: on on a CPU and wherever autocast
    runs (NHWC is what oneDNN's and the tensor cores' kernels want). 'off' always wins.
    """
    reason = ""
    if amp == "auto" and device.type == "cuda":
        dtype, reason = _cuda_dtype("auto"), "auto: CUDA"
    elif amp == "auto":
        unit = cpu_bf16_unit()
        family = _family(model_name)
        if unit is None:
            dtype, reason = None, "auto: this CPU has no native bf16"
        elif family not in CPU_BF16_FAMILIES:
            dtype, reason = None, f"auto: bf16 not measured to pay for {model_name} here"
        else:
            dtype, reason = torch.bfloat16, f"auto: {unit} bf16 on this CPU"
    elif amp == "off":
        dtype = None
    elif device.type == "cuda":
        dtype = _cuda_dtype(amp)
    else:
        dtype = torch.float16 if amp == "fp16" else torch.bfloat16
        if dtype == torch.bfloat16 and cpu_bf16_unit() is None:
            reason = "emulated: this CPU has no native bf16, expect it slower than fp32"
    if isinstance(channels_last, bool):  # config.json files of older runs hold true/false
        channels_last = "on" if channels_last else "off"
    layout = channels_last == "on" or (channels_last == "auto" and (
        dtype is not None or device.type == "cpu"))
    return Precision(dtype, layout, reason)


def _family(model_name: str | None) -> str | None:
    if model_name is None:
        return None
    try:
        return models.model_family(model_name)
    except ValueError:
        return None


def recorded_precision(checkpoint: dict, device: torch.device) -> Precision:
    """The precision a checkpoint's model trained with. Checkpoints written before it was
    recorded trained with the old --amp auto (bf16 on CUDA, fp32 on CPU) and a boolean
    --channels_last, both kept in their 'config'."""
    saved = checkpoint.get("precision")
    if isinstance(saved, dict):
        amp = saved["amp"]
        if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            amp = "fp16"  # trained where bf16 ran; this GPU has only fp16
        return choose_precision(amp, bool(saved["channels_last"]), device)
    config = checkpoint.get("config") or {}
    amp = config.get("amp", "auto")
    if amp == "auto":
        amp = "auto" if device.type == "cuda" else "off"
    return choose_precision(amp, bool(config.get("channels_last", False)), device)
