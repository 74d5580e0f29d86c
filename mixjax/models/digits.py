"""A small CNN for the 8x8 scikit-learn digits (the offline default run).

Two conv-BN-ReLU stages (32 then 64 channels, 3x3), each ending in a 2x2
max-pool (8x8 -> 4x4 -> 2x2), global average pooling, dense head: 19,562
parameters at 10 classes. With AdamW (3e-3, cosine) and batch 64 it reaches
about 98.5% test accuracy on the 80/20 stratified digits split after 300
steps and 99.5% after 1500 (about 7 s and 16 s on two shared CPU cores).
Mixing points: 'input', 'stage1', 'stage2', 'pre_logits'.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixjax.models import layers


class ConvBNStage(nn.Module):
  """(conv3x3 - BN - ReLU) per entry of `features`, then maxpool 2."""
  features: Sequence[int]
  norm: Callable[..., nn.Module]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i, f in enumerate(self.features):
      x = nn.Conv(f, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype,
                  kernel_init=layers.conv_init, name=f"conv{i + 1}")(x)
      x = nn.relu(self.norm(use_running_average=not train, name=f"bn{i + 1}")(x))
    return nn.max_pool(x, (2, 2), (2, 2))


class DigitsCNN(nn.Module):
  """f[B, 8, 8, 1] (any H, W >= 4) -> f[B, num_classes] logits (or unit vectors, head='cosine').

  Batch norm as in `ResNet` (global batch under jit; `axis_name` for
  shard_map/pmap).
  """
  num_classes: int = 10
  stages: Sequence[Sequence[int]] = ((32,), (64,))
  dtype: Any = jnp.float32
  head: str = "logits"
  embed_dim: Optional[int] = None
  axis_name: Optional[str] = None
  bn_momentum: float = 0.9

  mixing_points: ClassVar[tuple[str, ...]] = ("input", "stage1", "stage2", "pre_logits")

  def __post_init__(self):
    layers.check_common(self)
    if len(self.stages) != 2 or any(not s or min(s) < 1 for s in self.stages):
      raise ValueError(f"DigitsCNN: stages must be two non-empty lists of widths, got "
                       f"{self.stages!r}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    layers.check_images(x, "DigitsCNN", min_size=4)
    norm = functools.partial(nn.BatchNorm, momentum=self.bn_momentum, epsilon=1e-5,
                             dtype=self.dtype, axis_name=self.axis_name)
    x = layers.Point(name="input")(x)
    for i, features in enumerate(self.stages):
      x = ConvBNStage(tuple(features), norm, self.dtype, name=f"stage{i + 1}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = layers.Point(name="pre_logits")(x)
    return layers.output_head(x, num_classes=self.num_classes, head=self.head,
                              embed_dim=self.embed_dim, dtype=self.dtype)
