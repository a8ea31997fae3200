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
    augment = BatchAugmentation(spec)
    images = torch.rand(5, 3, 12, 10)
    torch.manual_seed(3)
    fast = augment._colour(images.clone())
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
