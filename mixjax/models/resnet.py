"""ResNet v1.5 for ImageNet (He et al. 2016; stride 2 in the 3x3 conv of bottlenecks).

Layouts of torchvision's resnet18 ... resnet152 (parameter counts equal:
ResNet-50 25,557,032, ResNet-101 44,549,160 at 1000 classes). Mixing points:
'input', 'stage1' ... 'stage4', 'pre_logits'.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixjax.models import layers

BLOCKS = ("basic", "bottleneck")


def _pad(k: int):
  return ((k // 2, k // 2), (k // 2, k // 2))


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut."""
  filters: int
  strides: int
  norm: Callable[..., nn.Module]
  dtype: Any = jnp.float32
  zero_init_residual: bool = True
  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             kernel_init=layers.conv_init)
    norm = functools.partial(self.norm, use_running_average=not train)
    last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    y = conv(self.filters, (3, 3), self.strides, padding=_pad(3), name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    y = conv(self.filters, (3, 3), padding=_pad(3), name="conv2")(y)
    y = norm(name="bn2", scale_init=last_scale)(y)
    if x.shape != y.shape:
      x = conv(self.filters, (1, 1), self.strides, name="proj_conv")(x)
      x = norm(name="proj_bn")(x)
    return nn.relu(x + y)


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3 (strided: v1.5), 1x1 expand (x4), with batch norm."""
  filters: int
  strides: int
  norm: Callable[..., nn.Module]
  dtype: Any = jnp.float32
  zero_init_residual: bool = True
  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             kernel_init=layers.conv_init)
    norm = functools.partial(self.norm, use_running_average=not train)
    last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    y = conv(self.filters, (1, 1), name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    y = conv(self.filters, (3, 3), self.strides, padding=_pad(3), name="conv2")(y)
    y = nn.relu(norm(name="bn2")(y))
    y = conv(self.filters * 4, (1, 1), name="conv3")(y)
    y = norm(name="bn3", scale_init=last_scale)(y)
    if x.shape != y.shape:
      x = conv(self.filters * 4, (1, 1), self.strides, name="proj_conv")(x)
      x = norm(name="proj_bn")(x)
    return nn.relu(x + y)


class Stage(nn.Module):
  """`num_blocks` residual blocks ('block1', ...); the first one has stride `strides`."""
  block: Any
  num_blocks: int
  filters: int
  strides: int
  norm: Callable[..., nn.Module]
  dtype: Any = jnp.float32
  zero_init_residual: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i in range(self.num_blocks):
      x = self.block(self.filters, self.strides if i == 0 else 1, self.norm, dtype=self.dtype,
                     zero_init_residual=self.zero_init_residual, name=f"block{i + 1}")(x, train)
    return x


class ResNet(nn.Module):
  """ResNet v1.5 (ImageNet stem: 7x7/2 conv, 3x3/2 max-pool).

  Input f[B, H, W, C] images; output f[B, num_classes] logits (or f32[B, d]
  unit vectors with head='cosine'). `dtype` is the compute dtype (parameters
  stay float32). Batch norm: statistics over the whole batch the model sees;
  under `jit` with a batch sharded over devices that is the global batch; inside
  `shard_map`/`pmap` set `axis_name` to the batch axis for the same.
  """
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  block: str = "bottleneck"
  num_classes: int = 1000
  width: int = 64
  dtype: Any = jnp.float32
  head: str = "logits"
  embed_dim: Optional[int] = None
  axis_name: Optional[str] = None
  bn_momentum: float = 0.9
  zero_init_residual: bool = True

  mixing_points: ClassVar[tuple[str, ...]] = (
      "input", "stage1", "stage2", "stage3", "stage4", "pre_logits")

  def __post_init__(self):
    layers.check_common(self)
    if self.block not in BLOCKS:
      raise ValueError(f"ResNet: block must be one of {BLOCKS}, got {self.block!r}.")
    if len(self.stage_sizes) != 4:
      raise ValueError(f"ResNet: stage_sizes must have 4 entries, got {self.stage_sizes!r}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    layers.check_images(x, "ResNet")
    norm = functools.partial(nn.BatchNorm, momentum=self.bn_momentum, epsilon=1e-5,
                             dtype=self.dtype, axis_name=self.axis_name)
    block = BasicBlock if self.block == "basic" else BottleneckBlock
    x = layers.Point(name="input")(x)
    x = nn.Conv(self.width, (7, 7), (2, 2), padding=_pad(7), use_bias=False, dtype=self.dtype,
                kernel_init=layers.conv_init, name="stem_conv")(x)
    x = nn.relu(norm(use_running_average=not train, name="stem_bn")(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=_pad(3))
    for i, n in enumerate(self.stage_sizes):
      x = Stage(block, n, self.width * 2**i, 1 if i == 0 else 2, norm, dtype=self.dtype,
                zero_init_residual=self.zero_init_residual, name=f"stage{i + 1}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = layers.Point(name="pre_logits")(x)
    return layers.output_head(x, num_classes=self.num_classes, head=self.head,
                              embed_dim=self.embed_dim, dtype=self.dtype)


STAGES = {18: ((2, 2, 2, 2), "basic"), 34: ((3, 4, 6, 3), "basic"),
          50: ((3, 4, 6, 3), "bottleneck"), 101: ((3, 4, 23, 3), "bottleneck"),
          152: ((3, 8, 36, 3), "bottleneck")}


def resnet(depth: int, **kwargs) -> ResNet:
  """ResNet-`depth` (18, 34, 50, 101, 152) v1.5; kwargs override (e.g. `width`, `stage_sizes`)."""
  if depth not in STAGES:
    raise ValueError(f"ResNet depth must be one of {sorted(STAGES)}, got {depth!r}.")
  sizes, block = STAGES[depth]
  return ResNet(**{"stage_sizes": sizes, "block": block, **kwargs})
