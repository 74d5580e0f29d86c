"""Wide ResNets (Zagoruyko & Komodakis 2016) for 32x32 images: WRN-28-10, WRN-16-8.

WRN-d-k: a 3x3 stem conv (16 channels), three stages of (d - 4) / 6
pre-activation blocks with 16k, 32k, 64k channels (strides 1, 2, 2), optional
dropout between the two convs of a block, final BN-ReLU, global average
pooling, dense head. WRN-28-10 at 10 classes: 36,479,194 parameters (the
paper's 36.5M). Mixing points: 'input', 'stage1' ... 'stage3', 'pre_logits'.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixjax.models import layers

_P1 = ((1, 1), (1, 1))


class WideBlock(nn.Module):
  """BN-ReLU-conv3x3 (strided), BN-ReLU-dropout-conv3x3.

  The shortcut is a 1x1 projection (after the first BN-ReLU) when the shape changes.
  """
  filters: int
  strides: int
  norm: Callable[..., nn.Module]
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             kernel_init=layers.conv_init)
    norm = functools.partial(self.norm, use_running_average=not train)
    out = nn.relu(norm(name="bn1")(x))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.filters:
      shortcut = conv(self.filters, (1, 1), self.strides, name="proj_conv")(out)
    y = conv(self.filters, (3, 3), self.strides, padding=_P1, name="conv1")(out)
    y = nn.relu(norm(name="bn2")(y))
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = conv(self.filters, (3, 3), padding=_P1, name="conv2")(y)
    return y + shortcut


class WideStage(nn.Module):
  """`num_blocks` wide blocks ('block1', ...); the first has stride `strides`."""
  num_blocks: int
  filters: int
  strides: int
  norm: Callable[..., nn.Module]
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i in range(self.num_blocks):
      x = WideBlock(self.filters, self.strides if i == 0 else 1, self.norm, self.dropout_rate,
                    dtype=self.dtype, name=f"block{i + 1}")(x, train)
    return x


class WideResNet(nn.Module):
  """WRN-`depth`-`widen_factor`.

  Input f[B, H, W, C]; output f[B, num_classes] logits, or f32[B, d] unit
  vectors with head='cosine'. Dropout (rate `dropout_rate`) draws from the
  'dropout' rng. Batch norm as in `ResNet`.
  """
  depth: int = 28
  widen_factor: int = 10
  num_classes: int = 10
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  head: str = "logits"
  embed_dim: Optional[int] = None
  axis_name: Optional[str] = None
  bn_momentum: float = 0.9

  mixing_points: ClassVar[tuple[str, ...]] = ("input", "stage1", "stage2", "stage3", "pre_logits")

  def __post_init__(self):
    layers.check_common(self)
    if self.depth < 10 or (self.depth - 4) % 6:
      raise ValueError(f"WideResNet: depth must be 6n + 4 with n >= 1, got {self.depth!r}.")
    if self.widen_factor < 1:
      raise ValueError(f"WideResNet: widen_factor must be >= 1, got {self.widen_factor!r}.")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"WideResNet: dropout_rate must be in [0, 1), got {self.dropout_rate!r}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    layers.check_images(x, "WideResNet")
    norm = functools.partial(nn.BatchNorm, momentum=self.bn_momentum, epsilon=1e-5,
                             dtype=self.dtype, axis_name=self.axis_name)
    n = (self.depth - 4) // 6
    x = layers.Point(name="input")(x)
    x = nn.Conv(16, (3, 3), padding=_P1, use_bias=False, dtype=self.dtype,
                kernel_init=layers.conv_init, name="stem_conv")(x)
    for i, width in enumerate((16, 32, 64)):
      x = WideStage(n, width * self.widen_factor, 1 if i == 0 else 2, norm, self.dropout_rate,
                    dtype=self.dtype, name=f"stage{i + 1}")(x, train)
    x = nn.relu(norm(use_running_average=not train, name="final_bn")(x))
    x = jnp.mean(x, axis=(1, 2))
    x = layers.Point(name="pre_logits")(x)
    return layers.output_head(x, num_classes=self.num_classes, head=self.head,
                              embed_dim=self.embed_dim, dtype=self.dtype)
