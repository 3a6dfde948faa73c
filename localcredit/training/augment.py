"""Data augmentation on whole batches, on the tensors' device, seeded per step.

``--augment crop:2,flip``: a random crop with 2 pixels of padding on each side (the "2-pixel jitter"
of local-loss and most CIFAR recipes) and a horizontal flip with probability 1/2. Every rule sees
the same augmented images: the Trainer augments a step's whole (global) batch before any rule or
process touches it. The random draws come from a generator seeded by (seed, epoch, step), so a
resumed run sees exactly the images the uninterrupted one saw.

The padding takes the value of a black pixel (the training set's smallest value per channel, which
is black after standardisation for MNIST-like data and near it for natural images), as padding a raw
image with zeros does before it is standardised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError


@dataclass(frozen=True)
class Augment:
    crop: int = 0  # padding of the random crop, in pixels (0: no crop)
    flip: bool = False

    @property
    def active(self) -> bool:
        return self.crop > 0 or self.flip

    def __str__(self) -> str:
        parts = ([f"crop:{self.crop}"] if self.crop else []) + (["flip"] if self.flip else [])
        return ",".join(parts) or "none"


def parse_augment(text: str) -> Augment:
    """``"crop:2,flip"`` -> Augment(crop=2, flip=True); ``"none"`` or ``""`` -> no augmentation."""
    crop, flip = 0, False
    for part in (p.strip() for p in text.split(",")):
        if part in ("", "none"):
            continue
        name, _, value = part.partition(":")
        if name == "flip" and not value:
            flip = True
        elif name == "crop" and value.isdigit():
            crop = int(value)
        else:
            raise UserError(f"--augment expects crop:N and/or flip, e.g. crop:2,flip; got {text!r}")
    return Augment(crop, flip)


def augment_seed(seed: int, epoch: int, step: int) -> int:
    return (seed * 1_000_003 + epoch) * 1_000_003 + step


def augment_batch(x: torch.Tensor, augment: Augment, generator: torch.Generator,
                  fill: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W) randomly cropped (padding ``augment.crop`` filled with ``fill`` (C,)) and flipped."""
    if x.dim() != 4:
        raise UserError(f"--augment needs image data (C, H, W); this data set has per-sample shape {tuple(x.shape[1:])}")
    if augment.crop:
        x = random_crop(x, augment.crop, generator, fill)
    if augment.flip:
        flipped = torch.rand(len(x), generator=generator, device=x.device) < 0.5
        x = torch.where(flipped[:, None, None, None], x.flip(-1), x)
    return x


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator, fill: torch.Tensor) -> torch.Tensor:
    """Each sample shifted by its own offset in [-pad, pad]^2, the uncovered border filled: one gather per batch."""
    batch, channels, height, width = x.shape
    padded = fill.view(1, channels, 1, 1).expand(batch, channels, height + 2 * pad, width + 2 * pad).clone()
    padded[:, :, pad:pad + height, pad:pad + width] = x
    top = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=x.device)
    left = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=x.device)
    rows = (top[:, None] + torch.arange(height, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (left[:, None] + torch.arange(width, device=x.device))[:, None, :]  # (B, 1, W)
    samples = torch.arange(batch, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[samples, rows, cols].permute(0, 3, 1, 2).contiguous()
