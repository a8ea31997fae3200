"""A torchvision v2 pipeline for train.py (what serialization cannot express goes in code):

    python train.py --augmentation examples/aug_v2.py:build

build() returns a transform of uint8 [C, H, W] tensors that keeps their size and dtype; the
toolkit runs it per image in worker processes and normalises on the device afterwards.
"""
from torchvision.transforms import v2


def build() -> v2.Compose:
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.3, 0.3, 0.3, 0.05)], p=0.8),
        v2.RandomGrayscale(p=0.05),
        v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5))], p=0.2),
        v2.RandomErasing(p=0.25, scale=(0.02, 0.15), value="random"),
    ])
