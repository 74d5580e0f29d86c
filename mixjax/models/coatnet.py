"""CoAtNet (Dai et al. 2021, "Marrying Convolution and Attention"): CoAtNet-0, -1, -2.

The C-C-T-T layout of the paper: a two-conv stem (S0, stride 2), two stages
of MBConv blocks (S1, S2) and two stages of transformer blocks with
relative attention (S3, S4); every stage halves the resolution in its first
block, so 224x224 inputs reach 7x7. Blocks are pre-norm (Eq. 5 of the paper):
    x <- Proj(Pool(x)) + Block(Norm(x))
with Pool a 2x2 average pool and Proj a 1x1 conv in the first block of a
stage (identity shortcut elsewhere).
MBConv: BN, 1x1 expand to 4x the output width, BN-GELU, depthwise 3x3 (the
stride sits here), BN-GELU, squeeze-excitation (SiLU, 0.25 of the output
width), 1x1 project.
Transformer: LN, (2x2 average pool), multi-head attention with head size 32
and a learned relative position bias per head (the paper's Eq. 3,
"pre-softmax"), then x + FFN(LN(x)) with expansion 4 and GELU.
Head: global average pool, LayerNorm, a tanh pre-logits layer as wide as S4
(`head_hidden_size`; 0 removes it), dense.

Parameter counts at 224x224, 1000 classes: CoAtNet-0 25,036,820 (paper:
25M), CoAtNet-1 42,225,776 (42M), CoAtNet-2 74,701,256 (75M). The paper gives
no code; details it leaves open (pool type, SE width and activation,
expansion base, head) follow timm's paper-matching `coatnet_*_224` configs,
which were aligned with Google's MaxViT/CoAtNet code. The paper's counts
are rounded to 1M; without the pre-logits layer CoAtNet-0 has 24.45M.

Mixing points: 'input', 'stem', 'stage1' ... 'stage4', 'pre_logits'.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mixjax.models import layers, vit

_P1 = ((1, 1), (1, 1))
ATTENTION_IMPLS = (None, "xla", "cudnn")


def _pool(x: jax.Array) -> jax.Array:
  return nn.avg_pool(x, (2, 2), (2, 2))


class SqueezeExcite(nn.Module):
  """Channel gating: x * sigmoid(W2 silu(W1 mean_hw(x))), W1 to `reduced` channels."""
  reduced: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.silu(nn.Conv(self.reduced, (1, 1), dtype=self.dtype, name="reduce")(s))
    s = nn.Conv(x.shape[-1], (1, 1), dtype=self.dtype, name="expand")(s)
    return x * nn.sigmoid(s)


class MBConv(nn.Module):
  """Pre-norm inverted bottleneck with squeeze-excitation: f[B, H, W, C] -> f[B, H/s, W/s, out]."""
  out_channels: int
  strides: int
  norm: Callable[..., nn.Module]
  expand_ratio: int = 4
  se_ratio: float = 0.25
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    in_c = x.shape[-1]
    conv = functools.partial(nn.Conv, dtype=self.dtype, kernel_init=layers.conv_init)
    norm = functools.partial(self.norm, use_running_average=not train)
    shortcut = _pool(x) if self.strides > 1 else x
    if self.strides > 1 or in_c != self.out_channels:
      shortcut = conv(self.out_channels, (1, 1), name="proj")(shortcut)
    mid = self.out_channels * self.expand_ratio
    y = norm(name="pre_bn")(x)
    y = conv(mid, (1, 1), use_bias=False, name="expand_conv")(y)
    y = nn.gelu(norm(name="expand_bn")(y), approximate=False)
    y = conv(mid, (3, 3), self.strides, padding=_P1, feature_group_count=mid, use_bias=False,
             name="dw_conv")(y)
    y = nn.gelu(norm(name="dw_bn")(y), approximate=False)
    y = SqueezeExcite(max(1, int(self.out_channels * self.se_ratio)), self.dtype, name="se")(y)
    y = conv(self.out_channels, (1, 1), name="project_conv")(y)
    return shortcut + y


def relative_position_index(h: int, w: int) -> np.ndarray:
  """int[hw, hw]: row of the (2h-1)(2w-1) relative-offset table for each (query, key) pair."""
  coords = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 2)
  rel = coords[:, None, :] - coords[None, :, :] + np.array([h - 1, w - 1])
  return rel[..., 0] * (2 * w - 1) + rel[..., 1]


class RelativeAttention(nn.Module):
  """Multi-head self-attention over an h x w grid with a learned relative position bias.

  f[B, h, w, C] -> f[B, h, w, out]. The bias table (f32[(2h-1)(2w-1), heads])
  fixes the grid size at initialisation.
  """
  out_channels: int
  head_dim: int = 32
  dtype: Any = jnp.float32
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, _ = x.shape
    heads = self.out_channels // self.head_dim
    t = x.reshape(b, h * w, x.shape[-1])
    # One fused q/k/v projection (lecun-normal depends on fan-in only: distributed as three).
    qkv = nn.DenseGeneral((3, heads, self.head_dim), dtype=self.dtype, name="qkv")(t)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    shape = ((2 * h - 1) * (2 * w - 1), heads)
    layers.check_param_shape(self, "relative_bias", shape, "a relative position table")
    table = self.param("relative_bias", nn.initializers.truncated_normal(0.02), shape)
    bias = table[relative_position_index(h, w)]  # [hw, hw, heads]
    bias = jnp.transpose(bias, (2, 0, 1))[None].astype(q.dtype)
    y = vit.dot_product_attention(q, k, v, bias=bias, implementation=self.implementation)
    y = nn.DenseGeneral(self.out_channels, axis=(-2, -1), dtype=self.dtype, name="out")(y)
    return y.reshape(b, h, w, self.out_channels)


class TransformerBlock(nn.Module):
  """Pre-norm relative-attention block (downsampling by a 2x2 pool when strides=2), then FFN."""
  out_channels: int
  strides: int
  head_dim: int = 32
  mlp_ratio: int = 4
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    shortcut = x
    y = nn.LayerNorm(dtype=self.dtype, name="ln1")(x)
    if self.strides > 1:
      shortcut, y = _pool(shortcut), _pool(y)
    if self.strides > 1 or x.shape[-1] != self.out_channels:
      shortcut = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="proj")(shortcut)
    x = shortcut + RelativeAttention(self.out_channels, self.head_dim, self.dtype,
                                     self.attention_impl, name="attention")(y)
    y = nn.LayerNorm(dtype=self.dtype, name="ln2")(x)
    y = nn.gelu(nn.Dense(self.out_channels * self.mlp_ratio, dtype=self.dtype, name="fc1")(y),
                approximate=False)
    return x + nn.Dense(self.out_channels, dtype=self.dtype, name="fc2")(y)


class CoAtStage(nn.Module):
  """`num_blocks` blocks ('block1', ...) of `kind` 'C' (MBConv) or 'T' (transformer).

  The first block has stride 2.
  """
  kind: str
  num_blocks: int
  out_channels: int
  norm: Callable[..., nn.Module]
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i in range(self.num_blocks):
      s = 2 if i == 0 else 1
      if self.kind == "C":
        block = MBConv(self.out_channels, s, self.norm, dtype=self.dtype, name=f"block{i + 1}")
      else:
        block = TransformerBlock(self.out_channels, s, dtype=self.dtype,
                                 attention_impl=self.attention_impl, name=f"block{i + 1}")
      x = block(x, train)
    return x


class CoAtNet(nn.Module):
  """CoAtNet classifier.

  Input f[B, H, W, C] with H, W divisible by 32 (and equal to the size at
  initialisation: relative position tables); output f[B, num_classes]
  logits, or f32[B, d] unit vectors with head='cosine'. `num_blocks` and
  `channels` are the paper's L and D for S0 ... S4. Batch norm (stem and
  MBConv stages) as in `ResNet`: global batch under jit, `axis_name` for
  shard_map/pmap. `attention_impl`: see `jax.nn.dot_product_attention`.
  """
  num_blocks: Sequence[int] = (2, 2, 3, 5, 2)
  channels: Sequence[int] = (64, 96, 192, 384, 768)
  block_types: str = "CCTT"
  num_classes: int = 1000
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None
  head: str = "logits"
  embed_dim: Optional[int] = None
  axis_name: Optional[str] = None
  bn_momentum: float = 0.9
  head_hidden_size: Optional[int] = None

  mixing_points: ClassVar[tuple[str, ...]] = (
      "input", "stem", "stage1", "stage2", "stage3", "stage4", "pre_logits")

  def __post_init__(self):
    layers.check_common(self)
    if len(self.num_blocks) != 5 or len(self.channels) != 5:
      raise ValueError("CoAtNet: num_blocks and channels need 5 entries (S0 ... S4), got "
                       f"{self.num_blocks!r} and {self.channels!r}.")
    if len(self.block_types) != 4 or set(self.block_types) - {"C", "T"}:
      raise ValueError(f"CoAtNet: block_types must be 4 letters C/T, got {self.block_types!r}.")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"CoAtNet: attention_impl must be one of {ATTENTION_IMPLS}, got "
                       f"{self.attention_impl!r}.")
    for kind, c in zip(self.block_types, self.channels[1:]):
      if kind == "T" and c % 32:
        raise ValueError(f"CoAtNet: transformer stages need channels divisible by 32 (head size),"
                         f" got {c}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    layers.check_images(x, "CoAtNet", divisible_by=32)
    norm = functools.partial(nn.BatchNorm, momentum=self.bn_momentum, epsilon=1e-5,
                             dtype=self.dtype, axis_name=self.axis_name)
    x = layers.Point(name="input")(x)
    x = Stem(self.num_blocks[0], self.channels[0], norm, self.dtype, name="stem")(x, train)
    for i, kind in enumerate(self.block_types):
      x = CoAtStage(kind, self.num_blocks[i + 1], self.channels[i + 1], norm, self.dtype,
                    self.attention_impl, name=f"stage{i + 1}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.LayerNorm(dtype=self.dtype, name="final_ln")(x)
    hidden = self.channels[-1] if self.head_hidden_size is None else self.head_hidden_size
    if hidden:
      x = nn.tanh(nn.Dense(hidden, dtype=self.dtype, name="pre_logits_dense")(x))
    x = layers.Point(name="pre_logits")(x)
    return layers.output_head(x, num_classes=self.num_classes, head=self.head,
                              embed_dim=self.embed_dim, dtype=self.dtype)


class Stem(nn.Module):
  """S0: `num_convs` 3x3 convs (the first with stride 2), BN-GELU between them."""
  num_convs: int
  channels: int
  norm: Callable[..., nn.Module]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i in range(self.num_convs):
      x = nn.Conv(self.channels, (3, 3), 2 if i == 0 else 1, padding=_P1, use_bias=False,
                  dtype=self.dtype, kernel_init=layers.conv_init, name=f"conv{i + 1}")(x)
      if i < self.num_convs - 1:
        x = nn.gelu(self.norm(use_running_average=not train, name=f"bn{i + 1}")(x),
                    approximate=False)
    return x


VARIANTS = {
    0: dict(num_blocks=(2, 2, 3, 5, 2), channels=(64, 96, 192, 384, 768)),
    1: dict(num_blocks=(2, 2, 6, 14, 2), channels=(64, 96, 192, 384, 768)),
    2: dict(num_blocks=(2, 2, 6, 14, 2), channels=(128, 128, 256, 512, 1024)),
}


def coatnet(variant: int, **kwargs) -> CoAtNet:
  """CoAtNet-`variant` (0, 1, 2) from Table 3 of the paper; kwargs override."""
  if variant not in VARIANTS:
    raise ValueError(f"CoAtNet variant must be one of {sorted(VARIANTS)}, got {variant!r}.")
  return CoAtNet(**{**VARIANTS[variant], **kwargs})
