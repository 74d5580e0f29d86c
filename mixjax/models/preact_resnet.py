"""Pre-activation ResNets for 32x32 (CIFAR-size) images (He et al., Identity Mappings, 2016).

The layout of the mixup / manifold mixup / MixupE CIFAR code: a 3x3 stem conv
(64 channels, no pooling), four stages of pre-activation blocks (64, 128, 256,
512 channels, strides 1, 2, 2, 2), a final BN-ReLU, global average pooling and
a dense head. PreActResNet-18 at 10 classes has 11,172,170 parameters: the
11,171,146 of the reference CIFAR code without the final BN, plus that BN's
1,024 (He et al.'s design has it). Mixing points: 'input', 'stage1' ...
'stage4', 'pre_logits'.

`SmallPreActResNet` is a narrow one-block-per-stage variant without batch
norm, at the size of scikit-learn's 8x8 digits, whose stem is a mixing point
too: the mixup paper's ablation mixes "at Layer k", before residual block k
(k = 1..4) or before the classifier (k = 5).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixjax.models import layers

_P1 = ((1, 1), (1, 1))


class PreActBlock(nn.Module):
  """BN-ReLU-conv3x3 twice.

  The shortcut (a 1x1 conv when the shape changes) starts after the first BN-ReLU.
  """
  filters: int
  strides: int
  norm: Callable[..., nn.Module]
  dtype: Any = jnp.float32
  expansion: ClassVar[int] = 1

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
    y = conv(self.filters, (3, 3), padding=_P1, name="conv2")(y)
    return y + shortcut


class PreActBottleneck(nn.Module):
  """Pre-activation bottleneck: BN-ReLU-conv1x1, BN-ReLU-conv3x3 (strided), BN-ReLU-conv1x1 (x4)."""
  filters: int
  strides: int
  norm: Callable[..., nn.Module]
  dtype: Any = jnp.float32
  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             kernel_init=layers.conv_init)
    norm = functools.partial(self.norm, use_running_average=not train)
    out = nn.relu(norm(name="bn1")(x))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != 4 * self.filters:
      shortcut = conv(4 * self.filters, (1, 1), self.strides, name="proj_conv")(out)
    y = conv(self.filters, (1, 1), name="conv1")(out)
    y = nn.relu(norm(name="bn2")(y))
    y = conv(self.filters, (3, 3), self.strides, padding=_P1, name="conv2")(y)
    y = nn.relu(norm(name="bn3")(y))
    y = conv(4 * self.filters, (1, 1), name="conv3")(y)
    return y + shortcut


class PreActStage(nn.Module):
  """`num_blocks` pre-activation blocks ('block1', ...); the first has stride `strides`."""
  block: Any
  num_blocks: int
  filters: int
  strides: int
  norm: Callable[..., nn.Module]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i in range(self.num_blocks):
      x = self.block(self.filters, self.strides if i == 0 else 1, self.norm, dtype=self.dtype,
                     name=f"block{i + 1}")(x, train)
    return x


class PreActResNet(nn.Module):
  """Pre-activation ResNet with a CIFAR stem.

  Input f[B, H, W, C] (32x32x3 for CIFAR/SVHN, 28x28x1 for (Fashion-)MNIST;
  any size works: pooling is global). Output f[B, num_classes] logits, or
  f32[B, d] unit vectors with head='cosine'. Batch norm as in `ResNet`
  (global batch under jit; `axis_name` for shard_map/pmap).
  """
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: str = "basic"
  num_classes: int = 10
  width: int = 64
  dtype: Any = jnp.float32
  head: str = "logits"
  embed_dim: Optional[int] = None
  axis_name: Optional[str] = None
  bn_momentum: float = 0.9

  mixing_points: ClassVar[tuple[str, ...]] = (
      "input", "stage1", "stage2", "stage3", "stage4", "pre_logits")

  def __post_init__(self):
    layers.check_common(self)
    if self.block not in ("basic", "bottleneck"):
      raise ValueError(f"PreActResNet: block must be 'basic' or 'bottleneck', got {self.block!r}.")
    if len(self.stage_sizes) != 4:
      raise ValueError(f"PreActResNet: stage_sizes must have 4 entries, got {self.stage_sizes!r}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    layers.check_images(x, "PreActResNet")
    norm = functools.partial(nn.BatchNorm, momentum=self.bn_momentum, epsilon=1e-5,
                             dtype=self.dtype, axis_name=self.axis_name)
    block = PreActBlock if self.block == "basic" else PreActBottleneck
    x = layers.Point(name="input")(x)
    x = nn.Conv(self.width, (3, 3), padding=_P1, use_bias=False, dtype=self.dtype,
                kernel_init=layers.conv_init, name="stem_conv")(x)
    for i, n in enumerate(self.stage_sizes):
      x = PreActStage(block, n, self.width * 2**i, 1 if i == 0 else 2, norm, dtype=self.dtype,
                      name=f"stage{i + 1}")(x, train)
    x = nn.relu(norm(use_running_average=not train, name="final_bn")(x))
    x = jnp.mean(x, axis=(1, 2))
    x = layers.Point(name="pre_logits")(x)
    return layers.output_head(x, num_classes=self.num_classes, head=self.head,
                              embed_dim=self.embed_dim, dtype=self.dtype)


class SmallPreActBlock(nn.Module):
  """x + layer(relu(layer(relu(x)))), layer a 3x3 conv ('conv1', 'conv2') or a dense layer
  ('dense1', 'dense2') of `features` outputs (no batch norm)."""
  features: int
  conv: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def layer(name):
      if self.conv:
        return nn.Conv(self.features, (3, 3), dtype=self.dtype, name=name)
      return nn.Dense(self.features, dtype=self.dtype, name=name)
    kind = "conv" if self.conv else "dense"
    y = layer(f"{kind}1")(nn.relu(x))
    y = layer(f"{kind}2")(nn.relu(y))
    return x + y


class SmallPreActResNet(nn.Module):
  """A small pre-activation ResNet: 'stem', `num_blocks` residual stages of one block, head.

  conv=True: images f[B, H, W, C] -> 3x3 conv stem and blocks of `width`
  channels, ReLU, global average pooling. conv=False: inputs f[B, ...] are
  flattened, the stem and the blocks are dense layers of `width` units (XLA's
  CPU convolutions are slow), then ReLU. Then a dense 'head': f[B,
  num_classes] logits (or unit vectors with head='cosine'). No batch norm.
  Mixing points: 'input', 'stem', 'stage1' ... 'stage{num_blocks}',
  'pre_logits'; mixing at 'stem' is "before residual block 1" and at
  'stage{k}' "before block k + 1" (the last: before the final ReLU and the
  classifier).
  """
  num_classes: int = 10
  width: int = 32
  num_blocks: int = 4
  conv: bool = True
  dtype: Any = jnp.float32
  head: str = "logits"
  embed_dim: Optional[int] = None

  def __post_init__(self):
    layers.check_common(self)
    if int(self.width) < 1 or int(self.num_blocks) < 1:
      raise ValueError(f"SmallPreActResNet: width and num_blocks must be positive integers, "
                       f"got width={self.width!r}, num_blocks={self.num_blocks!r}.")
    super().__post_init__()

  @property
  def mixing_points(self) -> tuple[str, ...]:
    """'input', 'stem', 'stage1' ... 'stage{num_blocks}', 'pre_logits'."""
    return ("input", "stem") + tuple(f"stage{k + 1}" for k in range(self.num_blocks)) + (
        "pre_logits",)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    if self.conv:
      layers.check_images(x, "SmallPreActResNet")
    else:
      layers.check_vectors(x, "SmallPreActResNet")
    x = layers.Point(name="input")(x)
    if self.conv:
      x = nn.Conv(self.width, (3, 3), dtype=self.dtype, name="stem")(x)
    else:
      x = nn.Dense(self.width, dtype=self.dtype, name="stem")(x.reshape(x.shape[0], -1))
    for k in range(self.num_blocks):
      x = SmallPreActBlock(self.width, self.conv, self.dtype, name=f"stage{k + 1}")(x)
    x = nn.relu(x)
    if self.conv:
      x = jnp.mean(x, axis=(1, 2))
    x = layers.Point(name="pre_logits")(x)
    return layers.output_head(x, num_classes=self.num_classes, head=self.head,
                              embed_dim=self.embed_dim, dtype=self.dtype)


STAGES = {18: ((2, 2, 2, 2), "basic"), 34: ((3, 4, 6, 3), "basic"),
          50: ((3, 4, 6, 3), "bottleneck"), 101: ((3, 4, 23, 3), "bottleneck")}


def preact_resnet(depth: int, **kwargs) -> PreActResNet:
  """PreActResNet-`depth` (18, 34, 50, 101) with the CIFAR stem; kwargs override."""
  if depth not in STAGES:
    raise ValueError(f"PreActResNet depth must be one of {sorted(STAGES)}, got {depth!r}.")
  sizes, block = STAGES[depth]
  return PreActResNet(**{"stage_sizes": sizes, "block": block, **kwargs})
