"""Figures of samples: image grids (any domain whose samples are images ``[N, C, H, W]``).

Written with Pillow (a dependency of matplotlib) and numpy only, atomically, so the core CLI can
draw a grid of any image model's samples without a domain's stack.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
from torch import Tensor

from .files import atomic_open

__all__ = ["image_grid", "save_image_grid", "is_image_batch"]


def is_image_batch(x: Tensor) -> bool:
    """Whether ``x`` looks like a batch of images: ``[N, C, H, W]`` with 1 or 3 channels."""
    return x.dim() == 4 and x.shape[1] in (1, 3)


def image_grid(images: Tensor, nrow: Optional[int] = None, pad: int = 1, value_range: tuple[float, float] = (-1.0, 1.0),
               min_width: int = 256) -> np.ndarray:
    """``images`` ``[N, C, H, W]`` (values in ``value_range``) tiled ``nrow`` per row (default ⌈√N⌉),
    with ``pad`` pixels of white between tiles, as a ``uint8`` array ``[rows, cols]`` (C = 1) or
    ``[rows, cols, 3]``; upscaled by an integer factor (nearest neighbour) to at least ``min_width``
    pixels, so 8×8 digits are visible."""
    if not is_image_batch(images):
        raise ValueError(f"an image grid needs [N, C, H, W] images with C = 1 or 3, got {tuple(images.shape)}")
    n, c, h, w = images.shape
    lo, hi = value_range
    x = ((images.detach().float().cpu().clamp(lo, hi) - lo) / (hi - lo) * 255.0).round()
    x = x.numpy().astype(np.uint8).transpose(0, 2, 3, 1)  # [N, H, W, C]
    ncol = int(nrow or math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncol)
    grid = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):  # a tile per image: N is a grid's worth (tens to hundreds), not a hot path
        r, q = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[top:top + h, left:left + w] = x[i]
    scale = max(1, math.ceil(min_width / grid.shape[1]))
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid[..., 0] if c == 1 else grid


def save_image_grid(images: Tensor, file: str | os.PathLike, nrow: Optional[int] = None, pad: int = 1,
                    value_range: tuple[float, float] = (-1.0, 1.0)) -> str:
    """Write :func:`image_grid` of ``images`` as a PNG, atomically; returns the file's path."""
    from PIL import Image

    grid = image_grid(images, nrow, pad, value_range)
    with atomic_open(file, "wb") as f:
        Image.fromarray(grid).save(f, format="PNG")
    return os.fspath(file)
