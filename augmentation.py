"""Augmentation: the named presets, batch augmentation on the training device, MixUp/CutMix.

A preset (AUGMENTATIONS) is random transforms applied to whole uint8 batches where the model runs:
flip, one affine warp (rotation, zoom, shift), colour jitter, then normalisation. In eval mode the
same module only converts and normalises, so validation and inference see exactly the cached crop.
MixUp/CutMix turn hard labels into soft targets for the soft-target losses of loss.py.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from checked_io import UserError

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
    help: str = ""

    @property
    def has_affine(self) -> bool:
        return self.rotate > 0 or self.scale != (1.0, 1.0) or self.translate > 0


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
}


class BatchAugmentation(nn.Module):
    """uint8 [B, H, W, C] batch -> normalized float [B, C, H, W] on the batch's device.

    In train mode each image gets its own random flip, affine warp (rotation, zoom, shift and flip
    as one resampling) and colour jitter; in eval mode it only converts and normalizes, so
    validation and test see exactly the cached crop. The warp runs as one grid_sample on the GPU,
    and as OpenCV warps of the uint8 images in threads on the CPU, where float grid sampling costs
    more than the model step.
    """

    def __init__(self, spec: AugmentSpec, mean=IMAGENET_MEAN, std=IMAGENET_STD, channels: int = 3):
        super().__init__()
        self.spec = spec
        mean, std = list(mean), list(std)
        if channels == 4:
            mean, std = mean + [EDGE_MEAN], std + [EDGE_STD]
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("gray_weights", torch.tensor([0.299, 0.587, 0.114]), persistent=False)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        spec, training = self.spec, self.training
        warped = False
        if training and spec.has_affine and batch.device.type == "cpu":
            batch, warped = self._warp_uint8(batch), True
        # permute keeps the NHWC memory: the result is channels_last, as the GPU kernels like
        images = batch.permute(0, 3, 1, 2).float()
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        jitter = training and bool(spec.brightness or spec.contrast or spec.saturation)
        if not (jitter or (training and (spec.flip or spec.has_affine) and not warped)):
            return images.mul_(1 / (255 * std)).sub_(mean / std)  # one pass: uint8 -> normalized
        images.div_(255)
        if training and not warped:
            images = self._geometry(images)
        if jitter:
            images = self._colour(images)
        return images.sub_(mean).div_(std)

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

    def _geometry(self, images: torch.Tensor) -> torch.Tensor:
        n, device = images.shape[0], images.device
        if not self.spec.has_affine:
            flip = self._flips(n, device)
            if device.type == "cuda":  # no host sync for the mask
                return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
            chosen = flip.nonzero().squeeze(1)
            images[chosen] = images[chosen].flip(-1)
            return images
        theta = self._theta(n, *images.shape[-2:], device)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection",
                             align_corners=False)

    def _warp_uint8(self, batch: torch.Tensor) -> torch.Tensor:
        """The same random affine maps as _geometry, applied by cv2.warpAffine to uint8 images."""
        n, height, width = batch.shape[:3]
        theta = self._theta(n, height, width, batch.device).double().numpy()
        # normalized (align_corners=False) -> pixel coordinates: x_n = a * x + b
        a = np.array([2 / width, 2 / height])
        b = np.array([1 / width - 1, 1 / height - 1])
        source = batch.numpy()
        out = np.empty_like(source)

        def warp(i: int) -> None:
            t = theta[i]
            pixel = np.empty((2, 3))
            for row in range(2):
                pixel[row, 0] = t[row, 0] * a[0] / a[row]
                pixel[row, 1] = t[row, 1] * a[1] / a[row]
                pixel[row, 2] = (t[row, 0] * b[0] + t[row, 1] * b[1] + t[row, 2] - b[row]) / a[row]
            warped = cv2.warpAffine(source[i], pixel, (width, height),
                                    flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                    borderMode=cv2.BORDER_REFLECT_101)
            out[i] = warped.reshape(out[i].shape)  # cv2 drops a trailing channel of 1

        # torch's thread count, so OMP_NUM_THREADS=1 for folds run side by side holds here too
        with ThreadPoolExecutor(min(4, torch.get_num_threads())) as pool:
            list(pool.map(warp, range(n)))
        return torch.from_numpy(out)

    def _colour(self, images: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast and saturation jitter as ONE per-image 3x3 colour matrix.

        With b, c, s the three factors, w the grey weights (summing to 1) and g the image's mean
        grey, the three ColorJitter steps compose exactly to  c*b*(s*I + (1-s)*1w^T) x + (1-c)*b*g,
        then one clamp: one pass over the pixels instead of a dozen full-size temporaries.
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
        offset = ((1 - contrast) * brightness * mean_gray).view(n, 1, 1, 1)
        jittered = torch.einsum("nij,njhw->nihw", matrix, rgb).add_(offset).clamp_(0, 1)
        if images.shape[1] == 3:
            return jittered
        images[:, :3] = jittered
        return images


def build_augmentation(name: str, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                       channels: int = 3) -> BatchAugmentation:
    """The preset ``name`` as a BatchAugmentation (train mode augments, eval mode normalises)."""
    if name not in AUGMENTATIONS:
        raise UserError(f"unknown augmentation '{name}'; choose one of: {', '.join(AUGMENTATIONS)}")
    return BatchAugmentation(AUGMENTATIONS[name], mean, std, channels)


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
