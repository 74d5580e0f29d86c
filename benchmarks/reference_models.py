"""Plain Flax reference models and train steps, written as a user would, for comparison.

`ResNet50` (v1.5, 25,557,032 parameters at 1000 classes) and `ViT` (B/16:
86,567,656 parameters at 224 px and 1000 classes) use only `flax.linen`;
`make_step` is value_and_grad + optax update (+ batch-norm statistics). They
are the baseline the library's `mixjax.train_step.train_step` (with the zoo
model and ERM) is compared against: same arithmetic, so any extra FLOPs, bytes
or fusions are the library's overhead. `cost` reads XLA's cost analysis of a
compiled step.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

PyTree = Any
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Bottleneck(nn.Module):
  """1x1 - 3x3 (strided) - 1x1 (x4) with batch norm, projection shortcut when shapes change."""
  filters: int
  strides: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=_conv_init)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype)
    y = nn.relu(norm()(conv(self.filters, (1, 1))(x)))
    y = nn.relu(norm()(conv(self.filters, (3, 3), self.strides, padding=((1, 1), (1, 1)))(y)))
    y = norm(scale_init=nn.initializers.zeros)(conv(self.filters * 4, (1, 1))(y))
    if x.shape != y.shape:
      x = norm()(conv(self.filters * 4, (1, 1), self.strides)(x))
    return nn.relu(x + y)


class ResNet50(nn.Module):
  """ResNet-50 v1.5: f[B, H, W, 3] -> f[B, num_classes] logits; `dtype` is the compute dtype.

  `width` and `stage_sizes` shrink it for tests (the zoo's `resnet50` takes the same overrides).
  """
  num_classes: int = 1000
  width: int = 64
  stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.Conv(self.width, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False,
                dtype=self.dtype, kernel_init=_conv_init)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                     dtype=self.dtype)(x)
    x = nn.max_pool(nn.relu(x), (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for i, n in enumerate(self.stage_sizes):
      for j in range(n):
        x = Bottleneck(self.width * 2**i, 2 if (i > 0 and j == 0) else 1, self.dtype)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)


class Block(nn.Module):
  """Pre-LN transformer block with `nn.MultiHeadDotProductAttention`."""
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.LayerNorm(dtype=self.dtype)(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype)(y, y)
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.Dense(x.shape[-1], dtype=self.dtype)(nn.gelu(
        nn.Dense(self.mlp_dim, dtype=self.dtype)(y), approximate=False))
    return x + y


class ViT(nn.Module):
  """ViT (default B/16): f[B, H, W, 3] -> f[B, num_classes] logits, class-token pooling."""
  patch_size: int = 16
  hidden_size: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  num_classes: int = 1000
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    p, d = self.patch_size, self.hidden_size
    x = nn.Conv(d, (p, p), (p, p), padding="VALID", dtype=self.dtype)(x)
    b = x.shape[0]
    x = x.reshape(b, -1, d)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(x.dtype), x], axis=1)
    x = x + self.param("pos", nn.initializers.normal(0.02), (1,) + x.shape[1:]).astype(x.dtype)
    for _ in range(self.depth):
      x = Block(self.num_heads, self.mlp_dim, self.dtype)(x)
    x = nn.LayerNorm(dtype=self.dtype)(x)[:, 0]
    return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros)(x)


def make_step(model: nn.Module, tx: optax.GradientTransformation) -> Callable[..., Any]:
  """The user's train step (not jitted): (params, batch_stats, opt_state, x, y) -> new ones, loss.

  x: f[B, H, W, 3]; y: int32[B]. `batch_stats` is {} for models without batch norm.
  """
  def step(params, batch_stats, opt_state, x, y):
    def loss_fn(p):
      variables = {"params": p, **({"batch_stats": batch_stats} if batch_stats else {})}
      if batch_stats:
        logits, new = model.apply(variables, x, train=True, mutable=["batch_stats"])
        new = new["batch_stats"]
      else:
        logits, new = model.apply(variables, x, train=True), {}
      loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
      return jnp.mean(loss), new
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss
  return step


def count_fusions(hlo_text: str) -> int:
  """Number of top-level fusion instructions in the entry computation of optimized HLO text."""
  entry, n = False, 0
  for line in hlo_text.splitlines():
    if line.startswith("ENTRY"):
      entry = True
    elif entry and line.startswith("}"):
      break
    elif entry and " fusion(" in line:
      n += 1
  return n


def cost(fn: Callable[..., Any], *args: Any, donate: tuple[int, ...] = ()) -> dict[str, float]:
  """Compile `jax.jit(fn)` for `args`: {'flops', 'bytes', 'fusions', 'compile_s'}.

  'flops' and 'bytes' ('bytes accessed') are XLA's cost analysis of the whole
  compiled program; 'fusions' counts the top-level fusions of its entry
  computation; 'compile_s' the seconds of lowering plus compiling.
  """
  t0 = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
  seconds = time.perf_counter() - t0
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  analysis = analysis or {}
  return {"flops": float(analysis.get("flops", float("nan"))),
          "bytes": float(analysis.get("bytes accessed", float("nan"))),
          "fusions": float(count_fusions(compiled.as_text())), "compile_s": seconds}


def init(model: nn.Module, x: jax.Array, key: Optional[jax.Array] = None) -> tuple[PyTree, PyTree]:
  """(params, batch_stats or {}) of `model` on a sample batch `x`."""
  variables = model.init(jax.random.key(0) if key is None else key, x, train=False)
  return variables["params"], variables.get("batch_stats", {})
