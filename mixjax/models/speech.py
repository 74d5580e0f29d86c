"""LeNet and VGG-11/13 for 160x101 log-spectrograms (Google speech commands, mixup_beyond_erm 3.4).

The layouts of the speech-commands reference code the mixup paper's numbers
come from ("two convolutional and two fully-connected layers" is the
classifier part):
- `LeNet`: conv5x5(20)-maxpool2-ReLU, conv5x5(20)-channel dropout-maxpool2-ReLU,
  Dense(1000)-ReLU-dropout, Dense(C). 160x101 inputs give 37x22x20 = 16,280
  features into the first dense layer.
- `VGG` (11 or 13): the VGG conv stacks with batch norm (3x3 convs, max-pool
  2 after each of the 5 stages), flatten (5x3x512 = 7,680 features at
  160x101), Dense(512)-ReLU, Dense(C). The reference code has no ReLU between
  its two dense layers; without one they collapse to one linear map, so it
  is added here.
Inputs f[B, H, W, 1] (H, W at least 16 for LeNet, 32 for VGG).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixjax.models import layers

VGG_STAGES = {
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


class LeNetStage(nn.Module):
  """conv5x5 (VALID) - [channel dropout] - maxpool 2 - ReLU."""
  features: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.Conv(self.features, (5, 5), padding="VALID", dtype=self.dtype, name="conv")(x)
    if self.dropout_rate:
      # Dropout2d: whole channels, the same mask over height and width.
      x = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2), deterministic=not train)(x)
    return nn.relu(nn.max_pool(x, (2, 2), (2, 2)))


class LeNet(nn.Module):
  """LeNet for spectrograms: f[B, H, W, C] -> f[B, num_classes] logits.

  Dropout (rate `dropout_rate`, from the 'dropout' rng) on the second conv's
  channels and after the first dense layer. Mixing points: 'input',
  'stage1', 'stage2', 'pre_logits'.
  """
  num_classes: int = 30
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  head: str = "logits"
  embed_dim: Optional[int] = None

  mixing_points: ClassVar[tuple[str, ...]] = ("input", "stage1", "stage2", "pre_logits")

  def __post_init__(self):
    layers.check_common(self)
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"LeNet: dropout_rate must be in [0, 1), got {self.dropout_rate!r}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    layers.check_images(x, "LeNet", min_size=16)
    x = layers.Point(name="input")(x)
    x = LeNetStage(20, 0.0, self.dtype, name="stage1")(x, train)
    x = LeNetStage(20, self.dropout_rate, self.dtype, name="stage2")(x, train)
    x = x.reshape(x.shape[0], -1)
    layers.check_param_shape(self, ("fc1", "kernel"), (x.shape[1], 1000), "flattened features")
    x = nn.relu(nn.Dense(1000, dtype=self.dtype, name="fc1")(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = layers.Point(name="pre_logits")(x)
    return layers.output_head(x, num_classes=self.num_classes, head=self.head,
                              embed_dim=self.embed_dim, dtype=self.dtype)


class VGGStage(nn.Module):
  """(conv3x3 - BN - ReLU) per entry of `features`, then maxpool 2."""
  features: Sequence[int]
  norm: Callable[..., nn.Module]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i, f in enumerate(self.features):
      x = nn.Conv(f, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                  kernel_init=layers.conv_init, name=f"conv{i + 1}")(x)
      x = nn.relu(self.norm(use_running_average=not train, name=f"bn{i + 1}")(x))
    return nn.max_pool(x, (2, 2), (2, 2))


class VGG(nn.Module):
  """VGG-`depth` (11 or 13) with batch norm for spectrograms: f[B, H, W, C] -> f[B, num_classes].

  Conv widths are those of VGG scaled by `width` / 64. Batch norm as in
  `ResNet` (global batch under jit; `axis_name` for shard_map/pmap).
  Mixing points: 'input', 'stage1' ... 'stage5', 'pre_logits'.
  """
  depth: int = 11
  num_classes: int = 30
  width: int = 64
  hidden_size: int = 512
  dtype: Any = jnp.float32
  head: str = "logits"
  embed_dim: Optional[int] = None
  axis_name: Optional[str] = None
  bn_momentum: float = 0.9

  mixing_points: ClassVar[tuple[str, ...]] = (
      "input", "stage1", "stage2", "stage3", "stage4", "stage5", "pre_logits")

  def __post_init__(self):
    layers.check_common(self)
    if self.depth not in VGG_STAGES:
      raise ValueError(f"VGG: depth must be one of {sorted(VGG_STAGES)}, got {self.depth!r}.")
    if self.width < 1 or self.hidden_size < 1:
      raise ValueError(f"VGG: width and hidden_size must be positive, got {self.width!r}, "
                       f"{self.hidden_size!r}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    layers.check_images(x, "VGG", min_size=32)
    norm = functools.partial(nn.BatchNorm, momentum=self.bn_momentum, epsilon=1e-5,
                             dtype=self.dtype, axis_name=self.axis_name)
    x = layers.Point(name="input")(x)
    for i, features in enumerate(VGG_STAGES[self.depth]):
      features = tuple(f * self.width // 64 for f in features)
      x = VGGStage(features, norm, self.dtype, name=f"stage{i + 1}")(x, train)
    x = x.reshape(x.shape[0], -1)
    layers.check_param_shape(self, ("fc1", "kernel"), (x.shape[1], self.hidden_size),
                             "flattened features")
    x = nn.relu(nn.Dense(self.hidden_size, dtype=self.dtype, name="fc1")(x))
    x = layers.Point(name="pre_logits")(x)
    return layers.output_head(x, num_classes=self.num_classes, head=self.head,
                              embed_dim=self.embed_dim, dtype=self.dtype)
