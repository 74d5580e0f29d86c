"""Vision Transformer (Dosovitskiy et al. 2021): Ti/16, S/16, B/16, B/32, L/16.

Patch embedding (a strided conv), a class token, learned position embeddings,
pre-LN encoder blocks (multi-head self-attention with one fused q/k/v
projection, cuDNN's fused attention where the backend supports it, GELU MLP), final LayerNorm, class-token
pooling and a dense head. ViT-B/16 at 224x224 and 1000 classes has 86,567,656
parameters. Mixing points: 'input', 'embed' (tokens after the position
embeddings), 'block1' ... 'block{depth}', 'pre_logits'.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixjax.models import layers

ATTENTION_IMPLS = (None, "xla", "cudnn")
POOLS = ("token", "gap")

_dense_init = dict(kernel_init=nn.initializers.xavier_uniform(),
                   bias_init=nn.initializers.normal(stddev=1e-6))


def _can_use_cudnn(q: jax.Array, bias: Optional[jax.Array]) -> bool:
  """Whether cuDNN's fused attention takes these shapes and dtypes on this backend.

  cuDNN flash attention: a CUDA GPU, bf16/fp16 inputs, a head dimension that
  is a multiple of 8 and at most 128, and a bias of the inputs' dtype.
  """
  return (jax.default_backend() == "gpu"
          and q.dtype in (jnp.bfloat16, jnp.float16)
          and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128
          and (bias is None or bias.dtype == q.dtype))


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          bias: Optional[jax.Array] = None,
                          implementation: Optional[str] = None) -> jax.Array:
  """Attention f[B, T, H, d] x3 (bias f[1 or B, H, T, T]) -> f[B, T, H, d].

  implementation: None: cuDNN's fused kernel where `_can_use_cudnn` (a CUDA GPU,
  bf16/fp16, head dimension a multiple of 8 up to 128), else XLA's (CPU, TPU,
  float32, other shapes); a cuDNN refusal at trace time falls back to XLA too.
  'cudnn' asks for cuDNN and raises a ValueError where it cannot run; 'xla'
  is XLA's.
  """
  if implementation not in ATTENTION_IMPLS:
    raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLS}, got "
                     f"{implementation!r}.")
  if implementation == "cudnn" and not _can_use_cudnn(q, bias):
    raise ValueError(
        f"attention implementation='cudnn' needs a CUDA GPU, bfloat16/float16 inputs and a "
        f"head dimension that is a multiple of 8 up to 128; got backend "
        f"{jax.default_backend()!r}, dtype {q.dtype}, head dimension {q.shape[-1]}. Use "
        f"implementation=None (cuDNN where supported, else XLA) or 'xla'.")
  if implementation is None and _can_use_cudnn(q, bias):
    try:
      return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="cudnn")
    except (NotImplementedError, ValueError, RuntimeError):  # Unsupported here: XLA below.
      pass
  return jax.nn.dot_product_attention(q, k, v, bias=bias,
                                      implementation="xla" if implementation is None
                                      else implementation)


def _stacked_init(init: Any, parts: int) -> Any:
  """An initializer of a flat kernel f[D, parts * n]: `init` on each f[D, n] part.

  The fused q/k/v kernel is then distributed as three separate ones would be.
  """
  def stacked(key, shape, dtype=jnp.float32):
    d_in, d_out = shape
    keys = jax.random.split(key, parts)
    return jnp.concatenate([init(k, (d_in, d_out // parts), dtype) for k in keys], axis=1)
  return stacked


class SelfAttention(nn.Module):
  """Multi-head self-attention: f[B, T, D] -> f[B, T, D].

  One fused projection to q, k and v (a DenseGeneral to [3, heads, D / heads]
  named 'qkv'; the same parameter count as three separate projections, each
  third initialised as a separate Xavier-uniform kernel), `dot_product_attention`
  (implementation None: cuDNN where supported, else XLA), and the output
  projection 'out'.
  """
  num_heads: int
  dtype: Any = jnp.float32
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, bias: Optional[jax.Array] = None) -> jax.Array:
    d = x.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by num_heads={self.num_heads}.")
    head_dim = d // self.num_heads
    qkv = nn.DenseGeneral((3, self.num_heads, head_dim), dtype=self.dtype, name="qkv",
                          kernel_init=_stacked_init(nn.initializers.xavier_uniform(), 3))(x)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    if bias is not None:
      bias = bias.astype(q.dtype)
    y = dot_product_attention(q, k, v, bias=bias, implementation=self.implementation)
    return nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype, name="out",
                           kernel_init=nn.initializers.xavier_uniform())(y)


class MlpBlock(nn.Module):
  """Dense(mlp_dim) - GELU - dropout - Dense(D) - dropout."""
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    d = x.shape[-1]
    y = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1", **_dense_init)(x),
                approximate=False)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = nn.Dense(d, dtype=self.dtype, name="fc2", **_dense_init)(y)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(y)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + MHSA(LN(x)), then x + MLP(LN(x))."""
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y = nn.LayerNorm(dtype=self.dtype, name="ln1")(x)
    y = SelfAttention(self.num_heads, self.dtype, self.attention_impl, name="attention")(y)
    x = x + nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = nn.LayerNorm(dtype=self.dtype, name="ln2")(x)
    return x + MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, name="mlp")(y, train)


class PatchEmbed(nn.Module):
  """Images f[B, H, W, C] -> tokens f[B, 1 + HW/p^2, D] with position embeddings.

  The class token (when `class_token`) comes first.
  """
  patch_size: int
  hidden_size: int
  class_token: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch_size
    # Patch embedding: a linear map of flattened p x p patches (the paper's E).
    x = nn.Conv(self.hidden_size, (p, p), (p, p), padding="VALID", dtype=self.dtype,
                name="patch", kernel_init=nn.initializers.lecun_normal())(x)
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    if self.class_token:
      cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(x.dtype), x], axis=1)
    shape = (1, x.shape[1], d)
    layers.check_param_shape(self, "pos_embedding", shape, "position embeddings")
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), shape)
    return x + pos.astype(x.dtype)


class ViT(nn.Module):
  """Vision Transformer classifier.

  Input f[B, H, W, C] with H, W divisible by `patch_size` (and equal to the
  size at initialisation: learned position embeddings); output
  f[B, num_classes] logits, or f32[B, d] unit vectors with head='cosine'.
  `attention_impl`: None (cuDNN where supported, else XLA), 'xla' or 'cudnn'. Dropout draws from
  the 'dropout' rng. `pool`: 'token' (class token) or 'gap' (mean of tokens).
  """
  patch_size: int = 16
  hidden_size: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  num_classes: int = 1000
  dropout_rate: float = 0.0
  pool: str = "token"
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None
  head: str = "logits"
  embed_dim: Optional[int] = None
  head_zeroinit: bool = True

  def __post_init__(self):
    layers.check_common(self)
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"ViT: attention_impl must be one of {ATTENTION_IMPLS}, got "
                       f"{self.attention_impl!r}.")
    if self.pool not in POOLS:
      raise ValueError(f"ViT: pool must be one of {POOLS}, got {self.pool!r}.")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"ViT: hidden_size={self.hidden_size} must be divisible by "
                       f"num_heads={self.num_heads}.")
    super().__post_init__()

  @property
  def mixing_points(self) -> tuple[str, ...]:
    """'input', 'embed', 'block1' ... 'block{depth}', 'pre_logits'."""
    return ("input", "embed") + tuple(f"block{i + 1}" for i in range(self.depth)) + (
        "pre_logits",)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    layers.check_images(x, "ViT", divisible_by=self.patch_size, min_size=self.patch_size)
    x = layers.Point(name="input")(x)
    x = PatchEmbed(self.patch_size, self.hidden_size, self.pool == "token", self.dtype,
                   name="embed")(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.dropout_rate, self.dtype,
                       self.attention_impl, name=f"block{i + 1}")(x, train)
    x = nn.LayerNorm(dtype=self.dtype, name="final_ln")(x)
    x = x[:, 0] if self.pool == "token" else jnp.mean(x, axis=1)
    x = layers.Point(name="pre_logits")(x)
    init = nn.initializers.zeros if self.head_zeroinit else nn.linear.default_kernel_init
    return layers.output_head(x, num_classes=self.num_classes, head=self.head,
                              embed_dim=self.embed_dim, dtype=self.dtype, kernel_init=init)


VARIANTS = {
    "Ti/16": dict(patch_size=16, hidden_size=192, depth=12, num_heads=3, mlp_dim=768),
    "S/16": dict(patch_size=16, hidden_size=384, depth=12, num_heads=6, mlp_dim=1536),
    "B/16": dict(patch_size=16, hidden_size=768, depth=12, num_heads=12, mlp_dim=3072),
    "B/32": dict(patch_size=32, hidden_size=768, depth=12, num_heads=12, mlp_dim=3072),
    "L/16": dict(patch_size=16, hidden_size=1024, depth=24, num_heads=16, mlp_dim=4096),
}


def vit(variant: str, **kwargs) -> ViT:
  """ViT-`variant` ('Ti/16', 'S/16', 'B/16', 'B/32', 'L/16'); kwargs override the variant."""
  if variant not in VARIANTS:
    raise ValueError(f"ViT variant must be one of {sorted(VARIANTS)}, got {variant!r}.")
  return ViT(**{**VARIANTS[variant], **kwargs})
