"""Fully connected networks: the UCI classifier and the mixup-GAN generator / discriminator.

- `MLP`: 2 x 128 ReLU hidden layers (mixup_beyond_erm 3.5, UCI tables);
  `dropout` > 0 adds dropout after every hidden layer (the corrupted-labels
  experiment).
- `GanGenerator`, `GanDiscriminator`: 3 x 512 ReLU hidden layers, 2-D
  Gaussian noise in, 2-D samples out (mixup_beyond_erm 3.8, toy GANs);
  `pytorch_init=True` starts the linear layers as PyTorch's `nn.Linear`
  does, as in the authors' released GAN script.

Hidden layers are submodules 'stage1', 'stage2', ... (Dense + activation), so
their post-activation outputs are mixing points.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixjax.models import layers


def pytorch_linear_init(fan_in: int) -> dict[str, Any]:
  """`nn.Dense` initialisers of PyTorch's `nn.Linear`: kernel and bias ~ U(-b, b),
  b = 1 / sqrt(fan_in) (as {'kernel_init': ..., 'bias_init': ...})."""
  if int(fan_in) < 1:
    raise ValueError(f"fan_in must be a positive integer, got {fan_in!r}.")
  bound = 1.0 / math.sqrt(int(fan_in))

  def uniform(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return {"kernel_init": uniform, "bias_init": uniform}


def _dense(features: int, fan_in: int, dtype: Any, pytorch_init: bool, name: str) -> nn.Dense:
  """A Dense layer with flax's default or PyTorch's initialisation."""
  init = pytorch_linear_init(fan_in) if pytorch_init else {}
  return nn.Dense(features, dtype=dtype, name=name, **init)


class DenseReLU(nn.Module):
  """relu(Dense(features)(x)): f[B, D] -> f[B, features] (PyTorch's init if `pytorch_init`)."""
  features: int
  dtype: Any = jnp.float32
  pytorch_init: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = _dense(self.features, x.shape[-1], self.dtype, self.pytorch_init, "dense")
    return nn.relu(dense(x))


def _check_widths(model: nn.Module) -> None:
  widths = tuple(model.hidden_sizes)
  if not widths or any(int(w) < 1 for w in widths):
    raise ValueError(f"{type(model).__name__}: hidden_sizes must be positive integers, got "
                     f"{model.hidden_sizes!r}.")


class MLP(nn.Module):
  """Classifier on flat features.

  Input f[B, D] (f[B, ...] is flattened); output f[B, num_classes] logits, or
  f32[B, d] unit vectors with head='cosine'. Mixing points: 'input',
  'stage1' ... 'stage{len(hidden_sizes)}', 'pre_logits'. `dropout` in [0, 1):
  dropout after every hidden layer when called with train=True (after the
  mixing point, so a mixed hidden layer is dropped out as a whole).
  """
  num_classes: int = 2
  hidden_sizes: Sequence[int] = (128, 128)
  dtype: Any = jnp.float32
  head: str = "logits"
  embed_dim: Optional[int] = None
  dropout: float = 0.0

  def __post_init__(self):
    layers.check_common(self)
    _check_widths(self)
    if not 0.0 <= float(self.dropout) < 1.0:
      raise ValueError(f"MLP: dropout must be in [0, 1), got {self.dropout!r}.")
    super().__post_init__()

  @property
  def mixing_points(self) -> tuple[str, ...]:
    """'input', 'stage1' ... 'stage{len(hidden_sizes)}', 'pre_logits'."""
    return ("input",) + tuple(f"stage{i + 1}" for i in range(len(self.hidden_sizes))) + (
        "pre_logits",)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    layers.check_vectors(x, "MLP")
    x = layers.Point(name="input")(x)
    x = x.reshape(x.shape[0], -1)
    layers.check_param_shape(self, ("stage1", "dense", "kernel"),
                             (x.shape[1], self.hidden_sizes[0]), "features per example")
    for i, width in enumerate(self.hidden_sizes):
      x = DenseReLU(width, self.dtype, name=f"stage{i + 1}")(x)
      if self.dropout:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = layers.Point(name="pre_logits")(x)
    return layers.output_head(x, num_classes=self.num_classes, head=self.head,
                              embed_dim=self.embed_dim, dtype=self.dtype)


class GanGenerator(nn.Module):
  """Noise f[B, noise_dim] -> samples f[B, out_dim] (3 x 512 ReLU, linear output 'out').

  `pytorch_init`: every linear layer starts as PyTorch's `nn.Linear`
  (`pytorch_linear_init`) instead of flax's default (LeCun normal, zero bias).
  """
  noise_dim: int = 2
  out_dim: int = 2
  hidden_sizes: Sequence[int] = (512, 512, 512)
  dtype: Any = jnp.float32
  pytorch_init: bool = False

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
      x = DenseReLU(width, self.dtype, self.pytorch_init, name=f"stage{i + 1}")(x)
    return _dense(self.out_dim, x.shape[-1], self.dtype, self.pytorch_init, "out")(x)


class GanDiscriminator(nn.Module):
  """Samples f[B, in_dim] -> f[B, num_classes] logits (one: real vs fake) (3 x 512 ReLU).

  Mixing points: 'input', 'stage1' ... 'stage3', 'pre_logits'. `pytorch_init` as
  in `GanGenerator`.
  """
  in_dim: int = 2
  num_classes: int = 1
  hidden_sizes: Sequence[int] = (512, 512, 512)
  dtype: Any = jnp.float32
  pytorch_init: bool = False

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
      x = DenseReLU(width, self.dtype, self.pytorch_init, name=f"stage{i + 1}")(x)
    x = layers.Point(name="pre_logits")(x)
    return _dense(self.num_classes, x.shape[-1], self.dtype, self.pytorch_init, "head")(x)
