"""Fully connected networks: the UCI classifier and the mixup-GAN generator / discriminator.

- `MLP`: 2 x 128 ReLU hidden layers (mixup_beyond_erm 3.5, UCI tables).
- `GanGenerator`, `GanDiscriminator`: 3 x 512 ReLU hidden layers, 2-D
  Gaussian noise in, 2-D samples out (mixup_beyond_erm 3.8, toy GANs).

Hidden layers are submodules 'stage1', 'stage2', ... (Dense + activation), so
their post-activation outputs are mixing points.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixjax.models import layers


class DenseReLU(nn.Module):
  """relu(Dense(features)(x)): f[B, D] -> f[B, features]."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.relu(nn.Dense(self.features, dtype=self.dtype, name="dense")(x))


def _check_widths(model: nn.Module) -> None:
  widths = tuple(model.hidden_sizes)
  if not widths or any(int(w) < 1 for w in widths):
    raise ValueError(f"{type(model).__name__}: hidden_sizes must be positive integers, got "
                     f"{model.hidden_sizes!r}.")


class MLP(nn.Module):
  """Classifier on flat features.

  Input f[B, D] (f[B, ...] is flattened); output f[B, num_classes] logits, or
  f32[B, d] unit vectors with head='cosine'. Mixing points: 'input',
  'stage1' ... 'stage{len(hidden_sizes)}', 'pre_logits'.
  """
  num_classes: int = 2
  hidden_sizes: Sequence[int] = (128, 128)
  dtype: Any = jnp.float32
  head: str = "logits"
  embed_dim: Optional[int] = None

  def __post_init__(self):
    layers.check_common(self)
    _check_widths(self)
    super().__post_init__()

  @property
  def mixing_points(self) -> tuple[str, ...]:
    """'input', 'stage1' ... 'stage{len(hidden_sizes)}', 'pre_logits'."""
    return ("input",) + tuple(f"stage{i + 1}" for i in range(len(self.hidden_sizes))) + (
        "pre_logits",)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    layers.check_vectors(x, "MLP")
    x = layers.Point(name="input")(x)
    x = x.reshape(x.shape[0], -1)
    layers.check_param_shape(self, ("stage1", "dense", "kernel"),
                             (x.shape[1], self.hidden_sizes[0]), "features per example")
    for i, width in enumerate(self.hidden_sizes):
      x = DenseReLU(width, self.dtype, name=f"stage{i + 1}")(x)
    x = layers.Point(name="pre_logits")(x)
    return layers.output_head(x, num_classes=self.num_classes, head=self.head,
                              embed_dim=self.embed_dim, dtype=self.dtype)


class GanGenerator(nn.Module):
  """Noise f[B, noise_dim] -> samples f[B, out_dim] (3 x 512 ReLU, linear output)."""
  noise_dim: int = 2
  out_dim: int = 2
  hidden_sizes: Sequence[int] = (512, 512, 512)
  dtype: Any = jnp.float32

  def __post_init__(self):
    layers.check_common(self)
    _check_widths(self)
    super().__post_init__()

  @property
  def mixing_points(self) -> tuple[str, ...]:
    """'input', 'stage1' ... 'stage{len(hidden_sizes)}'."""
    return ("input",) + tuple(f"stage{i + 1}" for i in range(len(self.hidden_sizes)))

  @nn.compact
  def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
    del train
    layers.check_vectors(z, "GanGenerator", features=self.noise_dim)
    z = layers.Point(name="input")(z)
    x = z.reshape(z.shape[0], -1)
    for i, width in enumerate(self.hidden_sizes):
      x = DenseReLU(width, self.dtype, name=f"stage{i + 1}")(x)
    return nn.Dense(self.out_dim, dtype=self.dtype, name="out")(x)


class GanDiscriminator(nn.Module):
  """Samples f[B, in_dim] -> f[B, num_classes] logits (one: real vs fake) (3 x 512 ReLU).

  Mixing points: 'input', 'stage1' ... 'stage3', 'pre_logits'.
  """
  in_dim: int = 2
  num_classes: int = 1
  hidden_sizes: Sequence[int] = (512, 512, 512)
  dtype: Any = jnp.float32

  def __post_init__(self):
    layers.check_common(self)
    _check_widths(self)
    super().__post_init__()

  @property
  def mixing_points(self) -> tuple[str, ...]:
    """'input', 'stage1' ... 'stage{len(hidden_sizes)}', 'pre_logits'."""
    return ("input",) + tuple(f"stage{i + 1}" for i in range(len(self.hidden_sizes))) + (
        "pre_logits",)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    layers.check_vectors(x, "GanDiscriminator", features=self.in_dim)
    x = layers.Point(name="input")(x)
    x = x.reshape(x.shape[0], -1)
    for i, width in enumerate(self.hidden_sizes):
      x = DenseReLU(width, self.dtype, name=f"stage{i + 1}")(x)
    x = layers.Point(name="pre_logits")(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
