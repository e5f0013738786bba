"""The one place where samplers are chosen from configuration and initial noise is drawn.

Every experiment and the CLI build their sampler with :func:`sampler_from_config` (recipe
defaults, then a user's override such as ``--sampler rk4 --steps 20``) and draw the initial noise
with :func:`initial_noise` from the model's prior — the same prior its loss drew training noise
from — so a model is always integrated from the noise it was trained on.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .priors import GaussianPrior, Prior

__all__ = ["sampler_from_config", "initial_noise"]


def sampler_from_config(defaults: Optional[Mapping[str, Any]] = None, override: Optional[Mapping[str, Any]] = None):
    """``build_sampler`` from ``{**defaults, **override}`` (keys ``name``, ``steps`` and the sampler's
    own options).  An override may give only ``steps`` (the default sampler with other steps)."""
    from .samplers import build_sampler

    cfg = {"name": "euler", "steps": 50, **(defaults or {}), **(override or {})}
    steps = cfg.get("steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sampler steps must be a positive integer, got {steps!r}")
    return build_sampler(cfg.pop("name"), **cfg)


def initial_noise(num: int, event_shape: Sequence[int], prior: Optional[Prior] = None, seed: Optional[int] = None,
                  generator: Optional[torch.Generator] = None, device: Any = None, dtype: Optional[torch.dtype] = None,
                  mask: Optional[Tensor] = None) -> Tensor:
    """``[num, *event_shape]`` noise from ``prior`` (default N(0, I)), drawn on the CPU from
    ``generator`` or a generator seeded with ``seed`` (so the numbers do not depend on the device),
    then moved to ``device``; padded elements (``mask`` 0) are zero."""
    if num < 1:
        raise ValueError(f"the number of samples must be positive, got {num}")
    if generator is None:
        generator = torch.Generator().manual_seed(int(seed or 0))
    return (prior or GaussianPrior()).sample((int(num), *event_shape), generator=generator, device=device, dtype=dtype,
                                             mask=mask)
