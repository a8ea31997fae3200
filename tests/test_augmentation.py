"""maskface.augmentation: the presets' shapes and dtypes, flips, MixUp/CutMix targets, the
colour matrix, hue rotation, random erasing, and the CPU uint8 warp against the GPU
grid_sample path."""
import colorsys

import numpy as np
import pytest
import torch

from maskface import augmentation
from maskface.augmentation import AUGMENTATIONS, AugmentSpec, BatchAugmentation
from maskface.cli import UserError


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
@pytest.mark.parametrize("channels", [3, 4])
def test_augmentation_shapes_dtypes_and_eval_identity(name, channels):
    torch.manual_seed(0)
    batch = torch.randint(0, 256, (6, 32, 24, channels), dtype=torch.uint8)
    augment = augmentation.build_augmentation(name, channels=channels)
    augment.train()
    out = augment(batch)
    assert out.shape == (6, channels, 32, 24) and out.dtype == torch.float32
    augment.eval()
    plain = augment(batch)
    mean = torch.tensor(list(augmentation.IMAGENET_MEAN) + [0.5])[:channels].view(1, -1, 1, 1)
    std = torch.tensor(list(augmentation.IMAGENET_STD) + [0.5])[:channels].view(1, -1, 1, 1)
    expected = (batch.permute(0, 3, 1, 2).float() / 255 - mean) / std
    assert torch.allclose(plain, expected, atol=1e-6)
    # train mode stays within the normalized range of [0, 1] pixels
    low, high = ((0 - mean) / std).min(), ((1 - mean) / std).max()
    assert out.min() >= low - 1e-4 and out.max() <= high + 1e-4
    if AUGMENTATIONS[name] != AugmentSpec(crop="none", help=AUGMENTATIONS[name].help):
        assert not torch.allclose(out, plain)


def test_flip_only_augmentation_flips_some_images_exactly():
    torch.manual_seed(1)
    batch = torch.randint(0, 256, (16, 8, 6, 3), dtype=torch.uint8)
    augment = augmentation.build_augmentation("FlipAugmentation").train()
    out = augment(batch)
    plain = augment.eval()(batch)
    # the eval path normalizes in one fused pass, so compare to float rounding
    flipped = [torch.allclose(o, p.flip(-1), atol=1e-5) for o, p in zip(out, plain)]
    same = [torch.allclose(o, p, atol=1e-5) for o, p in zip(out, plain)]
    assert all(f or s for f, s in zip(flipped, same)) and any(flipped) and any(same)


def test_unknown_augmentation_lists_choices():
    with pytest.raises(UserError, match="CustomAugmentation"):
        augmentation.build_augmentation("CustomAugmentaton")


def test_mixup_cutmix_targets_are_soft_and_sum_to_one():
    torch.manual_seed(0)
    images = torch.rand(8, 3, 16, 12)
    labels = torch.randint(0, 18, (8,))
    for flags in [(True, False), (False, True), (True, True)]:
        mixer = augmentation.build_mixer(18, *flags)
        mixed, soft = mixer(images, labels)
        assert mixed.shape == images.shape and soft.shape == (8, 18)
        assert torch.allclose(soft.sum(1), torch.ones(8))
    assert augmentation.build_mixer(18, False, False) is None


def test_colour_matrix_equals_the_step_by_step_jitter():
    spec = AUGMENTATIONS["CustomAugmentation"]
    # the preset's colour jitter alone, unnormalized: forward is then the colour matrix only
    colour_only = AugmentSpec(brightness=spec.brightness, contrast=spec.contrast,
                              saturation=spec.saturation)
    augment = BatchAugmentation(colour_only, mean=[0.0] * 3, std=[1.0] * 3).train()
    pixels = torch.randint(0, 256, (5, 12, 10, 3), dtype=torch.uint8)
    images = pixels.permute(0, 3, 1, 2).float() / 255
    torch.manual_seed(3)
    fast = augment(pixels)
    torch.manual_seed(3)  # the same draws, applied as torchvision's ColorJitter steps
    b, c, s = (1 + (torch.rand(5) * 2 - 1) * strength
               for strength in (spec.brightness, spec.contrast, spec.saturation))
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    x = images * b.view(-1, 1, 1, 1)
    mean = (x * w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = (x - mean) * c.view(-1, 1, 1, 1) + mean
    gray = (x * w).sum(1, keepdim=True)
    x = ((x - gray) * s.view(-1, 1, 1, 1) + gray).clamp(0, 1)
    assert torch.allclose(fast, x, atol=1e-5)


def test_cpu_uint8_warp_matches_the_gpu_grid_sample_warp(cpu_and_gpu_warps):
    augment = BatchAugmentation(AugmentSpec(flip=True, rotate=15, scale=(0.9, 1.1),
                                                            translate=0.05))
    cpu, reference, batch = cpu_and_gpu_warps(augment, 48, 40)
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))  # borders reflect differently
    assert (cpu[inner] - reference[inner]).abs().max() < 3 / 255
    assert not torch.equal(cpu, batch.permute(0, 3, 1, 2).float() / 255)


# ---------------------------------------------------------------------------- batched policies
def test_hue_rotation_keeps_grey_and_turns_the_hsv_hue_by_the_factor():
    torch.manual_seed(0)
    # 200 grey images, each turned by its own random hue rotation (forward in train mode)
    levels = torch.linspace(0, 255, 200).round().to(torch.uint8)
    greys = levels.view(200, 1, 1, 1).expand(200, 4, 4, 3).contiguous()
    turned_greys = BatchAugmentation(AugmentSpec(hue=0.05), mean=[0.0] * 3,
                                     std=[1.0] * 3).train()(greys)
    assert torch.allclose(turned_greys, greys.permute(0, 3, 1, 2).float() / 255,
                          atol=1e-5)  # grey stays
    circle = [colorsys.hsv_to_rgb(h, 0.6, 0.7) for h in np.linspace(0, 1, 24, endpoint=False)]
    colours = torch.tensor(circle, dtype=torch.float32)
    for fraction in (0.05, -0.02):  # torchvision's hue factor: a fraction of the circle
        turned = (colours @ augmentation.hue_rotation(torch.tensor([fraction]))[0].T).clamp(0, 1)
        shifts = [(colorsys.rgb_to_hsv(*b)[0] - colorsys.rgb_to_hsv(*a)[0] + 0.5) % 1 - 0.5
                  for a, b in zip(colours.tolist(), turned.tolist())]
        assert np.sign(shifts).tolist() == [np.sign(fraction)] * 24
        assert abs(np.mean(shifts) - fraction) < 0.15 * abs(fraction)


def test_random_erasing_erases_about_p_of_the_images_with_noise():
    # erasing alone, unnormalized: forward in train mode erases the [0, 1] pixels and stops
    augment = BatchAugmentation(AugmentSpec(erasing=0.5), mean=[0.0] * 3, std=[1.0] * 3).train()
    images = torch.full((400, 32, 24, 3), 128, dtype=torch.uint8)
    grey = 128 / 255  # every pixel before erasing
    torch.manual_seed(0)
    out = augment(images)
    erased = (out != grey).flatten(1).any(1)
    assert 0.4 < erased.float().mean() < 0.6
    fraction = (out != grey).flatten(1).float().mean(1)[erased]
    assert fraction.min() > 0.005 and fraction.max() < 0.4
    assert out.min() >= 0 and out.max() <= 1


def test_the_gpu_and_cpu_erasing_fill_the_same_boxes():
    chosen = torch.tensor([True, False, True, True])
    top, left = torch.tensor([0, 3, 5, 10]), torch.tensor([2, 0, 7, 0])
    h, w = torch.tensor([4, 5, 10, 6]), torch.tensor([3, 5, 1, 8])
    changed = [(augmentation.fill_boxes(torch.full((4, 3, 16, 12), 2.0), chosen, top, left, h, w,
                                        masked) != 2.0) for masked in (True, False)]
    assert torch.equal(changed[0], changed[1])
    assert changed[0].sum() == 3 * (4 * 3 + 10 * 1 + 6 * 8)  # channels x the chosen boxes
