"""The competition's usual pipeline, which benchmark.py times the toolkit against: every photo
opened and decoded by PIL and transformed by torchvision, one at a time, in a DataLoader; a plain
fp32 training loop; validation every epoch; the best weights saved; inference through the same
kind of loader. Nothing here is used for training: it is the yardstick.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import f1_score
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision import transforms

from maskface import augmentation, model as models

# the baseline's CustomAugmentation crops 320 x 256 (H x W) out of the 512 x 384 portraits
BASELINE_CENTER_CROP = (320, 256)


def reference_transform(resize, mean=augmentation.IMAGENET_MEAN, std=augmentation.IMAGENET_STD,
                        center_crop: bool = False, jitter: bool | None = None) -> transforms.Compose:
    """The baseline's BaseAugmentation (Resize, ToTensor, Normalize); with center_crop, its
    CustomAugmentation: CenterCrop first and ColorJitter(0.1, 0.1, 0.1, 0.1) after the resize
    (``jitter`` False leaves the jitter out, as for validation and test)."""
    jitter = center_crop if jitter is None else jitter
    steps = [transforms.CenterCrop(BASELINE_CENTER_CROP)] if center_crop else []
    steps += [transforms.Resize(tuple(resize), Image.BILINEAR)]
    if jitter:
        steps += [transforms.ColorJitter(0.1, 0.1, 0.1, 0.1)]
    steps += [transforms.ToTensor(), transforms.Normalize(mean=mean, std=std)]
    return transforms.Compose(steps)


class ReferenceDataset(Dataset):
    """The baseline's dataset: every item opens and decodes its JPEG with PIL, then transforms it."""

    def __init__(self, paths: list[str], labels: np.ndarray, transform: transforms.Compose):
        self.paths, self.labels, self.transform = list(paths), np.asarray(labels), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self.transform(Image.open(self.paths[index])), int(self.labels[index])


def reference_loader(paths: list[str], labels: np.ndarray, *, resize, batch_size: int,
                     workers: int, n_images: int, center_crop: bool = False, shuffle: bool = True,
                     pin_memory: bool = False, mean=augmentation.IMAGENET_MEAN,
                     std=augmentation.IMAGENET_STD, seed: int | None = None) -> DataLoader:
    """The baseline's DataLoader over ``n_images`` draws (whole shuffled epochs, as shuffle=True
    gives, continued into a further epoch when more images than the data are needed). With a
    ``seed`` it shuffles as CachedBatches does after torch.manual_seed(seed)."""
    data = ReferenceDataset(paths, labels, reference_transform(resize, mean, std, center_crop))
    if shuffle:
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        sampler = RandomSampler(data, num_samples=n_images, generator=generator)
    else:
        sampler = np.resize(np.arange(len(data)), n_images).tolist()
    return DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, drop_last=True)


# ----------------------------------------------------------------------------------------------
# A whole job as the usual code runs it: train with validation, then predict the eval photos
# ----------------------------------------------------------------------------------------------
def _predict(net: nn.Module, loader: DataLoader) -> np.ndarray:
    net.eval()
    with torch.no_grad():
        return np.concatenate([net(images).argmax(1).numpy() for images, _ in loader])


def run_job(train: tuple[list[str], np.ndarray], val: tuple[list[str], np.ndarray],
            test_paths: list[str], *, model: str, resize, epochs: int, batch_size: int,
            valid_batch_size: int, lr: float, workers: int, center_crop: bool, seed: int,
            out_dir: str | Path) -> dict:
    """Train ``model`` for ``epochs`` in fp32 (Adam, cross entropy), scoring the val photos after
    every epoch and saving the best weights, then predict ``test_paths`` with them. Returns the
    whole job's seconds, the best val macro F1 and the test predictions."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    train_data = ReferenceDataset(*train, reference_transform(resize, center_crop=center_crop))
    plain = reference_transform(resize, center_crop=center_crop, jitter=False)

    def loader(paths, labels, size, shuffle=False):
        return DataLoader(ReferenceDataset(paths, labels, plain) if paths is not None else
                          train_data, batch_size=size, shuffle=shuffle, num_workers=workers)

    net = models.build_model(model, 18)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    best_f1, best_path = -1.0, Path(out_dir) / "reference_best.pth"
    for _ in range(epochs):
        net.train()
        for images, labels in loader(None, None, batch_size, shuffle=True):
            optimizer.zero_grad()
            criterion(net(images), labels).backward()
            optimizer.step()
        f1 = f1_score(val[1], _predict(net, loader(*val, valid_batch_size)), average="macro")
        if f1 > best_f1:
            best_f1 = f1
            torch.save(net.state_dict(), best_path)
    net.load_state_dict(torch.load(best_path, weights_only=True))
    predictions = _predict(net, loader(test_paths, np.zeros(len(test_paths), int),
                                       valid_batch_size))
    return {"seconds": time.perf_counter() - started, "best_f1": best_f1,
            "predictions": predictions}
