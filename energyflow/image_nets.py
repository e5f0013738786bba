"""Image networks with the energyflow signature ``net(x, t, cond)``.

``x: [B, C, H, W]`` with pixel values in ``[-1, 1]``; ``t: [B]`` in ``[0, 1]`` (**t = 0 noise, t = 1 data**,
as everywhere in energyflow); ``cond``: ``None``, integer class labels ``[B]``, or a batch dict holding
them under ``"label"``.

* :class:`UNetField` — diffusers' ``UNet2DModel`` behind ``net(x, t, cond)``; optionally class-conditional
  with a learned "no label" embedding for classifier-free guidance.
* :func:`unet_preset` — constructor arguments for a CPU-sized or a GPU-sized :class:`UNetField`.
* :class:`ConvClassifier` — an image classifier ``logits = net(x)`` with a feature layer (for Fréchet
  distances and classifier-based metrics).

Both classes are registered models: a saved file reloads with :func:`energyflow.load_model` and no
domain code.  This module does not import diffusers at import time (it is imported by
``energyflow.models`` whenever a model file is read); :class:`UNetField` imports it when built.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .models import register_model

__all__ = ["UNetField", "unet_preset", "ConvClassifier", "UNET_PRESETS"]

UNET_PRESETS: tuple[str, ...] = ("cpu", "gpu")
_ATTENTION_HEAD_DIM = 32  # channels per attention head (fewer when the attended level is narrower)

Cond = Union[None, Tensor, int, Mapping[str, Any]]


def _check_image_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    """``image_shape`` as a ``(C, H, W)`` tuple of positive ints (ValueError naming it otherwise)."""
    try:
        shape = tuple(operator.index(s) for s in image_shape)
    except TypeError:
        shape = ()
    if len(shape) != 3 or any(s <= 0 for s in shape):
        raise ValueError(f"image_shape must be [C, H, W] (three positive integers), got {image_shape!r}")
    return shape  # type: ignore[return-value]


@register_model("energyflow.UNetField")
class UNetField(nn.Module):
    """diffusers' ``UNet2DModel`` behind energyflow's ``net(x, t, cond)`` signature.

    ``net(x, t, cond) -> [B, C, H, W]`` for ``x: [B, C, H, W]`` (values in ``[-1, 1]``) and ``t: [B]``
    (or a scalar, shared by the batch) with **t = 0 noise and t = 1 data**.  diffusers counts time
    the other way (a large timestep is noise): :meth:`timestep` is the one adapter,
    ``timestep = (1 - t) * time_scale``.  What the output means (velocity, epsilon, x1) is fixed
    by how the network is trained, not by the network.

    The UNet has one resolution level per entry of ``block_out_channels`` (``layers_per_block`` ResNet
    blocks each, downsampling by 2 between levels), all ``DownBlock2D`` / ``UpBlock2D``; with
    ``attention`` the lowest-resolution level is ``AttnDownBlock2D`` / ``AttnUpBlock2D`` and the
    middle block has self-attention too.

    Class conditioning (``num_classes > 0``): an embedding of ``num_classes + 1`` labels is added to
    the time embedding; label ``num_classes`` (:attr:`null_label`) is "no label", used for
    classifier-free guidance.  ``cond`` may be ``None`` (every sample unlabelled), a LongTensor ``[B]``
    of labels in ``[-1, num_classes]`` (``-1`` means "no label"), or a dict with the labels under
    ``"label"`` (other keys, e.g. ``"mask"``, are ignored).

    Args:
        image_shape: ``[C, H, W]``; ``H`` and ``W`` must be divisible by ``2 ** (len(block_out_channels) - 1)``.
        block_out_channels: channels of each resolution level, highest resolution first.
        layers_per_block: ResNet blocks per level.
        attention: self-attention at the lowest resolution and in the middle block.
        num_classes: number of class labels (0 = unconditional).
        norm_num_groups: GroupNorm groups; must divide every entry of ``block_out_channels``.
        time_scale: diffusers timestep of pure noise (``t = 0``).
        dropout: dropout in the ResNet blocks.

    Attributes:
        sample_shape: ``tuple(image_shape)``.
        null_label: the "no label" class index (``num_classes``), or ``None`` for an unconditional net.
    """

    def __init__(self, image_shape: list[int], block_out_channels: list[int] = (32, 64), layers_per_block: int = 1,
                 attention: bool = False, num_classes: int = 0, norm_num_groups: int = 8, time_scale: float = 1000.0,
                 dropout: float = 0.0):
        super().__init__()
        c, h, w = _check_image_shape(image_shape)
        channels = [int(b) for b in block_out_channels]
        if not channels or any(b <= 0 for b in channels):
            raise ValueError(f"block_out_channels must be a non-empty list of positive integers, got {block_out_channels!r}")
        factor = 2 ** (len(channels) - 1)
        if h % factor or w % factor:
            raise ValueError(f"image_shape {list(image_shape)!r}: height and width must be divisible by {factor} "
                             f"(2 ** (len(block_out_channels) - 1) for block_out_channels {channels})")
        if int(layers_per_block) < 1:
            raise ValueError(f"layers_per_block must be >= 1, got {layers_per_block!r}")
        if int(norm_num_groups) < 1 or any(b % int(norm_num_groups) for b in channels):
            raise ValueError(f"norm_num_groups={norm_num_groups!r} must divide every entry of block_out_channels {channels}")
        if int(num_classes) < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes!r}")
        if not float(time_scale) > 0:
            raise ValueError(f"time_scale must be positive, got {time_scale!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")

        from diffusers import UNet2DModel  # imported here: energyflow.models imports this module cheaply

        levels = len(channels)
        down = ["DownBlock2D"] * levels
        up = ["UpBlock2D"] * levels
        if attention:
            down[-1] = "AttnDownBlock2D"  # the lowest resolution
            up[0] = "AttnUpBlock2D"
        self.sample_shape: tuple[int, ...] = (c, h, w)
        self.num_classes = int(num_classes)
        self.null_label: Optional[int] = self.num_classes if self.num_classes > 0 else None
        self.time_scale = float(time_scale)
        self.unet = UNet2DModel(
            sample_size=(h, w) if h != w else h, in_channels=c, out_channels=c,
            down_block_types=tuple(down), up_block_types=tuple(up), block_out_channels=tuple(channels),
            layers_per_block=int(layers_per_block), add_attention=bool(attention),
            attention_head_dim=min(_ATTENTION_HEAD_DIM, channels[-1]), norm_num_groups=int(norm_num_groups),
            dropout=float(dropout), num_class_embeds=self.num_classes + 1 if self.num_classes else None)

    def timestep(self, t: Tensor) -> Tensor:
        """diffusers' timestep for energyflow time ``t``: ``(1 - t) * time_scale`` (t = 0 noise →
        ``time_scale``; t = 1 data → 0).  Same shape as ``t``, float32."""
        return (1.0 - t.to(torch.float32)) * self.time_scale

    def labels(self, cond: Cond, batch: int, device: torch.device) -> Optional[Tensor]:
        """The class labels ``[batch]`` (LongTensor, "no label" as :attr:`null_label`) for ``cond``,
        or ``None`` for an unconditional net."""
        labels = cond.get("label") if isinstance(cond, Mapping) else cond
        if self.null_label is None:
            if labels is not None:
                raise ValueError("this UNetField is unconditional (num_classes=0) but was given class labels; "
                                 "build it with num_classes > 0 to condition on labels")
            return None
        if labels is None:
            return torch.full((batch,), self.null_label, dtype=torch.long, device=device)
        labels = torch.as_tensor(labels, device=device)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"class labels must be integers, got dtype {labels.dtype}")
        labels = labels.long().reshape(-1)
        if labels.numel() == 1 and batch != 1:
            labels = labels.expand(batch)
        if labels.shape != (batch,):
            raise ValueError(f"class labels must have shape [B] = [{batch}], got {list(labels.shape)}")
        if labels.numel() and bool((labels < -1).any() | (labels > self.null_label).any()):
            raise ValueError(f"class labels must lie in [-1, {self.null_label}] (-1 or {self.null_label} = no label), "
                             f"got values in [{int(labels.min())}, {int(labels.max())}]")
        return torch.where(labels < 0, torch.full_like(labels, self.null_label), labels)

    def forward(self, x: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        """``x: [B, C, H, W]``, ``t: [B]`` (or a scalar) in [0, 1] with t = 0 noise, ``cond``: see the
        class docstring.  Returns ``[B, C, H, W]``."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, self.sample_shape))}], got {list(x.shape)}")
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0 or t.shape == (1,):
            t = t.reshape(1).expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must have shape [B] = [{b}] (or be a scalar), got {list(t.shape)}")
        return self.unet(x, self.timestep(t), class_labels=self.labels(cond, b, x.device), return_dict=False)[0]


def _even_size(h: int, w: int, levels: int) -> bool:
    return h % 2 ** (levels - 1) == 0 and w % 2 ** (levels - 1) == 0


def unet_preset(name: str, image_shape: Sequence[int], num_classes: int = 0) -> dict:
    """Constructor arguments for a :class:`UNetField` (``UNetField(**unet_preset(...))``).

    * ``"cpu"`` — trains on two CPU cores: ``block_out_channels`` ``[32, 64]`` (``[32, 64, 64]`` when
      ``H >= 32``), one ResNet block per level, no attention, 8 GroupNorm groups.
    * ``"gpu"`` — ``[64, 128, 256]`` (``[64, 128, 256, 256]`` when ``H >= 32``), two ResNet blocks per
      level, attention at the lowest resolution, 32 GroupNorm groups.

    The extra level is added only when ``H`` and ``W`` stay divisible by the extra factor of two.
    The returned dict holds plain data only (lists, ints, bools), including ``image_shape`` and ``num_classes``.
    """
    c, h, w = _check_image_shape(image_shape)
    if name == "cpu":
        channels, layers, attention, groups = [32, 64], 1, False, 8
        extra = 64
    elif name == "gpu":
        channels, layers, attention, groups = [64, 128, 256], 2, True, 32
        extra = 256
    else:
        raise ValueError(f"unknown UNet preset {name!r}; the presets are {list(UNET_PRESETS)}")
    if h >= 32 and _even_size(h, w, len(channels) + 1):
        channels = channels + [extra]
    return {"image_shape": [c, h, w], "block_out_channels": channels, "layers_per_block": layers,
            "attention": attention, "num_classes": int(num_classes), "norm_num_groups": groups}


def _groups(channels: int, most: int = 8) -> int:
    return math.gcd(channels, most)


@register_model("energyflow.ConvClassifier")
class ConvClassifier(nn.Module):
    """An image classifier ``logits = net(x)`` with a feature layer (for Fréchet distances).

    ``x: [B, C, H, W]`` with values in ``[-1, 1]``; ``net(x) -> [B, num_classes]`` logits and
    ``net.features(x) -> [B, num_features]`` (the penultimate activations).

    Architectures:

    * ``"conv"``: a 3x3 stem convolution to ``width`` channels, then two stride-2 3x3 conv blocks
      (three when ``min(H, W) >= 16``), each Conv → GroupNorm → SiLU, doubling the channels; global
      average pool → dropout → Linear → ``num_features`` (SiLU) = the features → Linear → ``num_classes``.
    * ``"mlp"``: a different architecture, for an evaluator independent of the convolutional one:
      flatten → Linear(``8 * width``) → LayerNorm → GELU → dropout → Linear → ``num_features`` (GELU)
      = the features → Linear → ``num_classes``.

    Args:
        image_shape: ``[C, H, W]``.
        num_classes: number of classes K.
        arch: ``"conv"`` or ``"mlp"``.
        width: base width (channels of the first conv block; the MLP's hidden size is ``8 * width``).
        num_features: size of the feature layer.
        dropout: dropout probability (before the feature layer; off in eval mode).
    """

    ARCHS: tuple[str, ...] = ("conv", "mlp")

    def __init__(self, image_shape: list[int], num_classes: int = 10, arch: str = "conv", width: int = 32,
                 num_features: int = 128, dropout: float = 0.1):
        super().__init__()
        c, h, w = _check_image_shape(image_shape)
        if arch not in self.ARCHS:
            raise ValueError(f"unknown ConvClassifier arch {arch!r}; the archs are {list(self.ARCHS)}")
        for key, value in (("num_classes", num_classes), ("width", width), ("num_features", num_features)):
            if int(value) < 1:
                raise ValueError(f"{key} must be >= 1, got {value!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.sample_shape: tuple[int, ...] = (c, h, w)
        self.arch = arch
        self.num_classes = int(num_classes)
        self.num_features: int = int(num_features)
        width = int(width)
        if arch == "conv":
            layers: list[nn.Module] = [nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(_groups(width), width), nn.SiLU()]
            ch = width
            for _ in range(3 if min(h, w) >= 16 else 2):
                layers += [nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1), nn.GroupNorm(_groups(2 * ch), 2 * ch), nn.SiLU()]
                ch *= 2
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(float(dropout)),
                       nn.Linear(ch, self.num_features), nn.SiLU()]
        else:
            hidden = 8 * width
            layers = [nn.Flatten(), nn.Linear(c * h * w, hidden), nn.LayerNorm(hidden), nn.GELU(),
                      nn.Dropout(float(dropout)), nn.Linear(hidden, self.num_features), nn.GELU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(self.num_features, self.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """The penultimate activations ``[B, num_features]`` of images ``x: [B, C, H, W]``."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, self.sample_shape))}], got {list(x.shape)}")
        return self.body(x)

    def forward(self, x: Tensor, t: Optional[Tensor] = None, cond: Any = None) -> Tensor:
        """Logits ``[B, num_classes]`` of images ``x: [B, C, H, W]``; ``t`` and ``cond`` are accepted
        and ignored (so the classifier fits ``net(x, t, cond)`` call sites)."""
        return self.head(self.features(x))
