"""A stronger albumentations pipeline for train.py, and how examples/strong_aug.json was made.

    python train.py --augmentation examples/strong_aug.json           # the saved pipeline
    python train.py --augmentation examples/strong_aug.py:build       # the same, from this file
    python examples/strong_aug.py                                     # rewrite strong_aug.json

The pipeline sees each cached uint8 crop (H x W x 3, RGB) and must return the same size and
dtype: the toolkit normalises on the device afterwards, and random crops come from
--crop_margin/--rrc_scale. Copy this file, change build(), save it with A.save.
"""
from pathlib import Path

import albumentations as A
import cv2


def build() -> A.Compose:
    return A.Compose([
        A.HorizontalFlip(p=0.5),
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-10, 10),
                 border_mode=cv2.BORDER_REFLECT_101, p=0.7),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05, p=0.8),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.MotionBlur(blur_limit=(3, 5)),
                 A.GaussNoise(std_range=(0.02, 0.08))], p=0.3),
        A.CLAHE(clip_limit=2.0, p=0.1),
        A.ToGray(p=0.05),
        A.CoarseDropout(num_holes_range=(1, 2), hole_height_range=(0.1, 0.2),
                        hole_width_range=(0.1, 0.2), fill="random_uniform", p=0.3),
    ])


if __name__ == "__main__":
    target = Path(__file__).with_suffix(".json")
    A.save(build(), str(target))  # data_format="yaml" (and a .yaml name) works the same
    print(f"wrote {target}")
