"""Augmentation: the named presets, batch augmentation on the training device, MixUp/CutMix.

A preset (AUGMENTATIONS) is random transforms applied to whole uint8 batches where the model runs:
a random (resized) crop from the cache's margin, flip, one affine warp (rotation, zoom, shift),
colour jitter (hue included), then normalisation and random erasing. A preset may add a per-image
policy (POLICIES: TrivialAugmentWide, RandAugment), which pipelines.py runs on the CPU before the
batch reaches the device, as it runs a user's albumentations or torchvision pipeline. In eval mode
the same module only takes the centred crop and normalises, so validation and inference see
exactly the cached crop. MixUp/CutMix turn hard labels into soft targets for loss.py.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from maskface.cli import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EDGE_MEAN, EDGE_STD = 0.5, 0.5  # the Canny channel is 0/1 edges


@dataclass(frozen=True)
class AugmentSpec:
    """What an augmentation name means: its default crop and its random batch transforms."""
    crop: str = "center"                     # default --crop of this augmentation
    flip: bool = False                       # random horizontal flip
    rotate: float = 0.0                      # max rotation, degrees
    scale: tuple[float, float] = (1.0, 1.0)  # zoom range
    translate: float = 0.0                   # max shift, fraction of the image size
    brightness: float = 0.0                  # colour jitter strengths, as torchvision's ColorJitter
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0                         # max hue rotation, fraction of the colour circle
    erasing: float = 0.0                     # probability of one random-erasing rectangle
    rrc_scale: tuple[float, float] | None = None  # random-resized crop area range (None: off)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # its aspect range, relative to --resize's
    policy: str | None = None                # a POLICIES name: per-image, on the CPU
    help: str = ""

    @property
    def has_affine(self) -> bool:
        return self.rotate > 0 or self.scale != (1.0, 1.0) or self.translate > 0


# per-image augmentation policies (torchvision v2, on uint8 [C, H, W]): each image draws its own
# operations and magnitudes, which one batched kernel cannot express; pipelines.py runs them in
# DataLoader worker processes, overlapped with the model step
POLICIES = {
    "trivialaugment": lambda: v2.TrivialAugmentWide(),
    "randaugment": lambda: v2.RandAugment(num_ops=2, magnitude=9),
}

AUGMENTATIONS = {
    "BaseAugmentation": AugmentSpec(crop="none", help="resize + normalize, nothing random"),
    "CustomAugmentation": AugmentSpec(
        crop="center", flip=True, rotate=10.0, scale=(0.9, 1.1), translate=0.05,
        brightness=0.2, contrast=0.2, saturation=0.2,
        help="centre crop, resize, flip, small rotation/zoom/shift, colour jitter"),
    "FlipAugmentation": AugmentSpec(crop="center", flip=True, help="centre crop, resize, flip"),
    "StrongAugmentation": AugmentSpec(
        crop="center", flip=True, rotate=20.0, scale=(0.8, 1.2), translate=0.1,
        brightness=0.4, contrast=0.4, saturation=0.4,
        help="as Custom, stronger: for long runs and big models"),
    "HueAugmentation": AugmentSpec(
        crop="center", flip=True, rotate=10.0, scale=(0.9, 1.1), translate=0.05,
        brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05,
        help="as Custom, plus hue jitter (ColorJitter hue 0.05), batched"),
    "ErasingAugmentation": AugmentSpec(
        crop="center", flip=True, rotate=10.0, scale=(0.9, 1.1), translate=0.05,
        brightness=0.2, contrast=0.2, saturation=0.2, erasing=0.25,
        help="as Custom, plus RandomErasing (p 0.25, filled with noise), batched"),
    "TrivialAugmentWide": AugmentSpec(
        crop="center", flip=True, policy="trivialaugment",
        help="flip + torchvision TrivialAugmentWide, per image on the CPU"),
    "RandAugment": AugmentSpec(
        crop="center", flip=True, policy="randaugment",
        help="flip + torchvision RandAugment (2 ops, magnitude 9), per image on the CPU"),
}
# what runs on the device around a user's pipeline: the crops of --crop_margin/--rrc_scale only
PIPELINE_SPEC = AugmentSpec(crop="center", help="a user pipeline, per image on the CPU")
PIPELINE_SUFFIXES = (".json", ".yaml", ".yml")


def is_pipeline_value(value: str) -> bool:
    """An --augmentation value naming a user pipeline: a saved albumentations pipeline
    (.json/.yaml/.yml) or module:function (a module name or a .py path, then a function name)."""
    if value.lower().endswith(PIPELINE_SUFFIXES):
        return True
    module, _, function = value.rpartition(":")
    return bool(module) and function.isidentifier()


def augmentation_spec(value: str) -> AugmentSpec:
    """The device part of an --augmentation value: its preset, or PIPELINE_SPEC for a user
    pipeline; UserError listing the choices otherwise."""
    if value in AUGMENTATIONS:
        return AUGMENTATIONS[value]
    if is_pipeline_value(value):
        return PIPELINE_SPEC
    raise UserError(f"unknown augmentation '{value}'; {choices_text()}")


def choices_text() -> str:
    """What an --augmentation value may be, for the error of a wrong one."""
    return (f"choose one of: {', '.join(AUGMENTATIONS)}; or a saved albumentations pipeline "
            f"({'/'.join(PIPELINE_SUFFIXES)}), or module:function")


# RandomErasing's rectangle: torchvision's area and aspect ranges
ERASING_SCALE, ERASING_RATIO = (0.02, 0.33), (0.3, 3.3)
# RGB -> YIQ: Y is the grey axis, so a rotation of (I, Q) turns the hue and keeps the brightness
RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def hue_rotation(fractions: torch.Tensor) -> torch.Tensor:
    """RGB matrices [n, 3, 3] turning the hue by ``fractions`` of the colour circle: a rotation
    of I and Q about YIQ's grey axis (NVIDIA DALI's hue). It keeps grey and brightness, and turns
    the HSV hue by the fraction on average round the circle (torchvision's hue factor), though
    not pixel for pixel as torchvision's HSV round trip does."""
    # minus: a positive hue factor (red towards yellow) turns I/Q clockwise
    angle = -fractions * 2 * math.pi
    rotation = torch.zeros(len(fractions), 3, 3, device=fractions.device)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2] = torch.cos(angle), -torch.sin(angle)
    rotation[:, 2, 1], rotation[:, 2, 2] = torch.sin(angle), torch.cos(angle)
    yiq = torch.tensor(RGB_TO_YIQ, device=fractions.device)
    return torch.linalg.inv(yiq) @ rotation @ yiq


class BatchAugmentation(nn.Module):
    """uint8 [B, H', W', C] batch -> normalized float [B, C, H, W] on the batch's device.

    H' x W' is the cached size: H x W (--resize) plus ``margin`` rows and columns on each side. In
    train mode each image gets its own random crop from the margin (an H x W box, or a
    random-resized crop with spec.rrc_scale), flip, affine warp (the crop, rotation, zoom, shift
    and flip as one resampling), colour jitter and random erasing; in eval mode it only takes the
    centred H x W box and normalizes, so validation and test see exactly the cached crop. The warp
    runs as one grid_sample on the GPU, and as OpenCV warps of the uint8 images in threads on the
    CPU, where float grid sampling costs more than the model step.
    """

    def __init__(self, spec: AugmentSpec, mean=IMAGENET_MEAN, std=IMAGENET_STD, channels: int = 3,
                 margin: tuple[int, int] = (0, 0)):
        super().__init__()
        self.spec = spec
        self.margin = (int(margin[0]), int(margin[1]))
        mean, std = list(mean), list(std)
        if channels == 4:
            mean, std = mean + [EDGE_MEAN], std + [EDGE_STD]
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("gray_weights", torch.tensor([0.299, 0.587, 0.114]), persistent=False)

    @property
    def random_crops(self) -> bool:
        return self.margin != (0, 0) or self.spec.rrc_scale is not None

    @property
    def warps(self) -> bool:
        """Whether training resamples (affine or random-resized crop) rather than slices."""
        return self.spec.has_affine or self.spec.rrc_scale is not None

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        spec, training = self.spec, self.training
        if not (training and self.random_crops):
            batch = self.centre(batch)
        elif not self.warps:  # whole-pixel offsets: a slice, no resampling
            batch = self._random_crop_uint8(batch)
        warped = False
        if training and self.warps and batch.device.type == "cpu":
            batch, warped = self._warp_uint8(batch), True
        # permute keeps the NHWC memory: the result is channels_last, as the GPU kernels like
        images = batch.permute(0, 3, 1, 2).float()
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        jitter = training and bool(spec.brightness or spec.contrast or spec.saturation or spec.hue)
        erase = training and spec.erasing > 0
        if not (jitter or erase or (training and (spec.flip or self.warps) and not warped)):
            return images.mul_(1 / (255 * std)).sub_(mean / std)  # one pass: uint8 -> normalized
        images.div_(255)
        if training and not warped:
            images = self.geometry(images)
        if jitter:
            images = self._colour(images)
        if erase:
            images = self._erase(images)
        return images.sub_(mean).div_(std)

    def centre(self, batch: torch.Tensor) -> torch.Tensor:
        """The centred H x W box of uint8 [B, H', W', C] images: the crop of a margin-0 cache."""
        pad_h, pad_w = self.margin
        if not (pad_h or pad_w):
            return batch
        return batch[:, pad_h:batch.shape[1] - pad_h, pad_w:batch.shape[2] - pad_w]

    def _flips(self, n: int, device) -> torch.Tensor:
        if self.spec.flip:
            return torch.rand(n, device=device) < 0.5
        return torch.zeros(n, dtype=torch.bool, device=device)

    def _theta(self, n: int, height: int, width: int, device) -> torch.Tensor:
        """Per-image output -> input affine maps [n, 2, 3] in normalized coordinates."""
        spec = self.spec
        flip = self._flips(n, device)
        angle = (torch.rand(n, device=device) * 2 - 1) * math.radians(spec.rotate)
        low, high = spec.scale
        zoom = low + torch.rand(n, device=device) * (high - low)
        shift = (torch.rand(n, 2, device=device) * 2 - 1) * spec.translate * 2
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        sign = torch.where(flip, -1.0, 1.0)
        # corrected for the aspect ratio, so a rotation does not shear non-square images
        return torch.stack([
            torch.stack([cos * sign, -sin * height / width, shift[:, 0]], -1),
            torch.stack([sin * width / height * sign, cos, shift[:, 1]], -1),
        ], 1)

    def _warp_theta(self, n: int, height: int, width: int, device) -> torch.Tensor:
        """_theta of the output image, composed with each image's random crop of the cached
        height x width image: output -> cached-image maps [n, 2, 3]."""
        pad_h, pad_w = self.margin
        theta = self._theta(n, height - 2 * pad_h, width - 2 * pad_w, device)
        if not self.random_crops:
            return theta
        scale, offset = self._crop_boxes(n, height, width, device)
        theta = theta * scale.unsqueeze(-1)
        theta[:, :, 2] += offset
        return theta

    def _crop_boxes(self, n: int, height: int, width: int, device):
        """Each image's crop of the cached image as (scale, offset) [n, 2] (x, y), normalized:
        an H x W box at a random whole-pixel place, or torchvision's random-resized crop (area
        and aspect drawn, 10 tries, else the whole cached image) with spec.rrc_scale."""
        pad_h, pad_w = self.margin
        out_h, out_w = height - 2 * pad_h, width - 2 * pad_w
        if self.spec.rrc_scale is None:
            w = torch.full((n,), float(out_w), device=device)
            h = torch.full((n,), float(out_h), device=device)
            x0 = torch.randint(0, 2 * pad_w + 1, (n,), device=device).float()
            y0 = torch.randint(0, 2 * pad_h + 1, (n,), device=device).float()
        else:
            low, high = self.spec.rrc_scale
            log_low, log_high = (math.log(r) for r in self.spec.rrc_ratio)
            area = height * width * (low + torch.rand(n, 10, device=device) * (high - low))
            aspect = torch.exp(log_low + torch.rand(n, 10, device=device) * (log_high - log_low))
            aspect = aspect * out_w / out_h  # ratio 1 = the model input's aspect, no stretch
            w, h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
            fits = (w <= width) & (h <= height)
            first = fits.float().argmax(1, keepdim=True)
            w = torch.where(fits.any(1), w.gather(1, first).squeeze(1), float(width))
            h = torch.where(fits.any(1), h.gather(1, first).squeeze(1), float(height))
            x0 = torch.rand(n, device=device) * (width - w)
            y0 = torch.rand(n, device=device) * (height - h)
        scale = torch.stack([w / width, h / height], 1)
        offset = torch.stack([(2 * x0 + w) / width - 1, (2 * y0 + h) / height - 1], 1)
        return scale, offset

    def _random_crop_uint8(self, batch: torch.Tensor) -> torch.Tensor:
        """An H x W box of each uint8 image at a random whole-pixel place in its margin."""
        n, height, width = batch.shape[:3]
        (pad_h, pad_w), device = self.margin, batch.device
        y0 = torch.randint(0, 2 * pad_h + 1, (n, 1, 1), device=device)
        x0 = torch.randint(0, 2 * pad_w + 1, (n, 1, 1), device=device)
        rows = y0 + torch.arange(height - 2 * pad_h, device=device).view(1, -1, 1)
        cols = x0 + torch.arange(width - 2 * pad_w, device=device).view(1, 1, -1)
        return batch[torch.arange(n, device=device).view(-1, 1, 1), rows, cols]

    def geometry(self, images: torch.Tensor) -> torch.Tensor:
        """The random flip, crop and affine warp of float [B, C, H', W'] images as one
        grid_sample: the path a batch on the GPU takes in train mode (forward on the CPU warps the
        uint8 images instead, with the same random draws). Returns [B, C, H, W]."""
        n, device = images.shape[0], images.device
        if not self.warps:
            flip = self._flips(n, device)
            if device.type == "cuda":  # no host sync for the mask
                return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
            chosen = flip.nonzero().squeeze(1)
            images[chosen] = images[chosen].flip(-1)
            return images
        height, width = images.shape[-2:]
        theta = self._warp_theta(n, height, width, device)
        pad_h, pad_w = self.margin
        size = [n, images.shape[1], height - 2 * pad_h, width - 2 * pad_w]
        grid = F.affine_grid(theta, size, align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection",
                             align_corners=False)

    def _warp_uint8(self, batch: torch.Tensor) -> torch.Tensor:
        """The same random affine maps as geometry, applied by cv2.warpAffine to uint8 images."""
        n, height, width = batch.shape[:3]
        pad_h, pad_w = self.margin
        out_h, out_w = height - 2 * pad_h, width - 2 * pad_w
        theta = self._warp_theta(n, height, width, batch.device).double().numpy()
        # normalized (align_corners=False) -> pixel coordinates: x_n = a * x + b, in and out
        a_in, b_in = np.array([2 / width, 2 / height]), np.array([1 / width - 1, 1 / height - 1])
        a_out, b_out = np.array([2 / out_w, 2 / out_h]), np.array([1 / out_w - 1, 1 / out_h - 1])
        source = batch.numpy()
        out = np.empty((n, out_h, out_w, source.shape[3]), dtype=source.dtype)

        def warp(i: int) -> None:
            t = theta[i]
            pixel = np.empty((2, 3))
            for row in range(2):
                pixel[row, 0] = t[row, 0] * a_out[0] / a_in[row]
                pixel[row, 1] = t[row, 1] * a_out[1] / a_in[row]
                pixel[row, 2] = (t[row, 0] * b_out[0] + t[row, 1] * b_out[1] + t[row, 2]
                                 - b_in[row]) / a_in[row]
            warped = cv2.warpAffine(source[i], pixel, (out_w, out_h),
                                    flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                    borderMode=cv2.BORDER_REFLECT_101)
            out[i] = warped.reshape(out[i].shape)  # cv2 drops a trailing channel of 1

        # torch's thread count, so OMP_NUM_THREADS=1 for folds run side by side holds here too
        with ThreadPoolExecutor(min(4, torch.get_num_threads())) as pool:
            list(pool.map(warp, range(n)))
        return torch.from_numpy(out)

    def _colour(self, images: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast, saturation and hue jitter as ONE per-image 3x3 colour matrix.

        With b, c, s the three factors, w the grey weights (summing to 1) and g the image's mean
        grey, the three ColorJitter steps compose exactly to  c*b*(s*I + (1-s)*1w^T) x + (1-c)*b*g,
        then one clamp: one pass over the pixels instead of a dozen full-size temporaries. Hue
        is linear too (hue_rotation, about the grey axis): it multiplies the matrix, and keeps the
        grey offset as it is.
        """
        spec, n, device = self.spec, images.shape[0], images.device

        def factor(strength: float) -> torch.Tensor:
            if not strength:
                return torch.ones(n, device=device)
            return 1 + (torch.rand(n, device=device) * 2 - 1) * strength

        brightness, contrast, saturation = (factor(spec.brightness), factor(spec.contrast),
                                            factor(spec.saturation))
        weights = self.gray_weights.to(device)
        rgb = images[:, :3]
        mean_gray = rgb.mean((2, 3)) @ weights                                   # [n]
        eye = torch.eye(3, device=device)
        mixing = saturation.view(n, 1, 1) * eye + (1 - saturation).view(n, 1, 1) * weights.view(1, 1, 3)
        matrix = (contrast * brightness).view(n, 1, 1) * mixing                  # [n, 3, 3]
        if spec.hue:
            matrix = self._hue_matrices(n, device) @ matrix
        offset = ((1 - contrast) * brightness * mean_gray).view(n, 1, 1, 1)
        jittered = torch.einsum("nij,njhw->nihw", matrix, rgb).add_(offset).clamp_(0, 1)
        if images.shape[1] == 3:
            return jittered
        images[:, :3] = jittered
        return images

    def _hue_matrices(self, n: int, device) -> torch.Tensor:
        """Per-image RGB hue rotations [n, 3, 3] by a fraction of the circle in +-spec.hue."""
        fractions = (torch.rand(n, device=device) * 2 - 1) * self.spec.hue
        return hue_rotation(fractions)

    def _erase(self, images: torch.Tensor) -> torch.Tensor:
        """torchvision's RandomErasing per image (probability spec.erasing; area and aspect drawn,
        10 tries) on [0, 1] pixels, filled with uniform noise (random pixels, as timm's 'pixel'
        mode fills with noise rather than one colour)."""
        n, _, height, width = images.shape
        device = images.device
        low, high = ERASING_SCALE
        log_low, log_high = (math.log(r) for r in ERASING_RATIO)
        area = height * width * (low + torch.rand(n, 10, device=device) * (high - low))
        aspect = torch.exp(log_low + torch.rand(n, 10, device=device) * (log_high - log_low))
        h = torch.sqrt(area * aspect).round().long()
        w = torch.sqrt(area / aspect).round().long()
        fits = (h < height) & (w < width)
        first = fits.float().argmax(1, keepdim=True)
        h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
        erased = (torch.rand(n, device=device) < self.spec.erasing) & fits.any(1)
        top = (torch.rand(n, device=device) * (height - h + 1)).long()
        left = (torch.rand(n, device=device) * (width - w + 1)).long()
        return fill_boxes(images, erased, top, left, h, w, masked=device.type == "cuda")


def fill_boxes(images: torch.Tensor, chosen: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
               h: torch.Tensor, w: torch.Tensor, masked: bool) -> torch.Tensor:
    """Uniform noise in each ``chosen`` image's box (top, left, h, w: [n] each). ``masked``: one
    masked select over the batch, no host sync (the GPU's way); else a loop over the chosen boxes
    only (on the CPU, a quarter of the images and a fifth of their area on average, instead of a
    full-size random tensor)."""
    n, _, height, width = images.shape
    if masked:
        ys = torch.arange(height, device=images.device).view(1, -1, 1)
        xs = torch.arange(width, device=images.device).view(1, 1, -1)
        inside = ((ys >= top.view(-1, 1, 1)) & (ys < (top + h).view(-1, 1, 1))
                  & (xs >= left.view(-1, 1, 1)) & (xs < (left + w).view(-1, 1, 1)))
        inside &= chosen.view(-1, 1, 1)
        return torch.where(inside.unsqueeze(1), torch.rand_like(images), images)
    for i in chosen.nonzero().squeeze(1).tolist():
        y, x, hh, ww = top[i].item(), left[i].item(), h[i].item(), w[i].item()
        images[i, :, y:y + hh, x:x + ww].uniform_()
    return images


def build_augmentation(name: str, mean=IMAGENET_MEAN, std=IMAGENET_STD, channels: int = 3,
                       margin: tuple[int, int] = (0, 0),
                       rrc_scale: tuple[float, float] | None = None,
                       rrc_ratio: tuple[float, float] | None = None) -> BatchAugmentation:
    """The device part of --augmentation ``name`` as a BatchAugmentation (train mode augments,
    eval mode takes the centred crop and normalises); ``margin`` is the cache's (rows, columns) per
    side, and rrc_scale/rrc_ratio (--rrc_scale/--rrc_ratio) turn on random-resized crops."""
    spec = augmentation_spec(name)
    if rrc_scale is not None:
        spec = replace(spec, rrc_scale=tuple(rrc_scale))
    if rrc_ratio is not None:
        spec = replace(spec, rrc_ratio=tuple(rrc_ratio))
    return BatchAugmentation(spec, mean, std, channels, margin)


def dataset_statistics(images: np.ndarray, max_images: int = 2000, seed: int = 0) -> tuple[list, list]:
    """Per-channel RGB mean/std (0..1) of a cache, from up to max_images evenly sampled images."""
    rows = np.random.default_rng(seed).permutation(len(images))[:max_images]
    sample = np.asarray(images[np.sort(rows)][..., :3], dtype=np.float64) / 255
    return sample.mean((0, 1, 2)).tolist(), sample.std((0, 1, 2)).tolist()


def build_mixer(num_classes: int, mixup: bool, cutmix: bool, mixup_alpha: float = 0.2,
                cutmix_alpha: float = 1.0):
    """torchvision's batch MixUp/CutMix (one of them at random when both): hard labels in,
    soft targets out, for losses that take soft targets. None when neither is on."""
    mixers = []
    if mixup:
        mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix:
        mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
