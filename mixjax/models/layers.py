"""Pieces shared by the model families: named mixing points, output heads, input checks.

A *mixing point* is a named submodule whose output `mixjax.hidden.mix_at` can
replace by `lam * h + (1 - lam) * h[perm]`. Every model in the zoo calls
`Point(name='input')` on its input, one submodule per stage ('stage1', ...),
and `Point(name='pre_logits')` on the representation fed to the head, and
lists these names, in network order, in `model.mixing_points`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

HEADS = ("logits", "cosine")
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

# He (Kaiming) normal initialisation with fan-out, as in torchvision ResNets.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Point(nn.Module):
  """The identity: marks a named place in a network where activations can be mixed.

  `x` (any shape and dtype) is returned unchanged; `mixjax.hidden.mix_at`
  intercepts this call to mix it.
  """

  @nn.compact
  def __call__(self, x: Any) -> Any:
    return x


def check_common(model: nn.Module) -> None:
  """ValueError for a bad `head`, `num_classes`, `embed_dim` or `dtype` of `model`."""
  name = type(model).__name__
  head = getattr(model, "head", "logits")
  if head not in HEADS:
    raise ValueError(f"{name}: head must be one of {HEADS}, got {head!r}.")
  num_classes = getattr(model, "num_classes", 1)
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f"{name}: num_classes must be a positive integer, got {num_classes!r}.")
  embed_dim = getattr(model, "embed_dim", None)
  if embed_dim is not None and (not isinstance(embed_dim, (int, np.integer)) or embed_dim < 1):
    raise ValueError(f"{name}: embed_dim must be None or a positive integer, got {embed_dim!r}.")
  dtype = getattr(model, "dtype", jnp.float32)
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in DTYPES]:
    raise ValueError(f"{name}: dtype must be one of float32, bfloat16, float16, got {dtype!r}.")


def output_head(x: jax.Array, *, num_classes: int, head: str = "logits",
                embed_dim: Optional[int] = None, dtype: Any = jnp.float32,
                kernel_init: Any = nn.linear.default_kernel_init) -> jax.Array:
  """The output layer, a `Dense` submodule named 'head' (call inside a compact method).

  head='logits': f[B, num_classes] logits.
  head='cosine': f32[B, d] unit vectors (d = `embed_dim`, default `num_classes`),
    a linear projection normalised to unit length, for the negative-cosine loss.
  """
  if head == "logits":
    return nn.Dense(num_classes, dtype=dtype, kernel_init=kernel_init, name="head")(x)
  if head == "cosine":
    z = nn.Dense(embed_dim or num_classes, dtype=dtype, name="head")(x).astype(jnp.float32)
    return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-6)
  raise ValueError(f"head must be one of {HEADS}, got {head!r}.")


def check_images(x: Any, model: str, *, channels: Optional[int] = None,
                 divisible_by: int = 1, min_size: int = 1) -> None:
  """ValueError unless `x` is a float batch of images f[B, H, W, C] the model can take."""
  shape = tuple(getattr(x, "shape", ()))
  dtype = getattr(x, "dtype", None)
  if len(shape) != 4:
    raise ValueError(f"{model} takes images of shape (batch, height, width, channels); got an "
                     f"input of shape {shape}.")
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{model} takes floating-point images; got dtype {dtype}.")
  _, h, w, c = shape
  if channels is not None and c != channels:
    raise ValueError(f"{model} takes {channels}-channel images; got input shape {shape}.")
  if h < min_size or w < min_size:
    raise ValueError(f"{model} needs images of at least {min_size}x{min_size}; got input "
                     f"shape {shape}.")
  if h % divisible_by or w % divisible_by:
    raise ValueError(f"{model} needs height and width divisible by {divisible_by}; got input "
                     f"shape {shape}.")


def check_vectors(x: Any, model: str, *, features: Optional[int] = None) -> None:
  """ValueError unless `x` is a float batch f[B, ...] with at least one feature axis."""
  shape = tuple(getattr(x, "shape", ()))
  dtype = getattr(x, "dtype", None)
  if len(shape) < 2:
    raise ValueError(f"{model} takes a batch of shape (batch, features...); got an input of "
                     f"shape {shape}.")
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{model} takes floating-point inputs; got dtype {dtype}.")
  if features is not None and int(np.prod(shape[1:])) != features:
    raise ValueError(f"{model} takes {features} features per example; got input shape {shape}.")


def check_tokens(x: Any, model: str, *, min_length: int = 1) -> None:
  """ValueError unless `x` is an integer batch of token ids int[B, T] with T >= min_length."""
  shape = tuple(getattr(x, "shape", ()))
  dtype = getattr(x, "dtype", None)
  if len(shape) != 2:
    raise ValueError(f"{model} takes token ids of shape (batch, length); got an input of "
                     f"shape {shape}.")
  if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"{model} takes integer token ids; got dtype {dtype}.")
  if shape[1] < min_length:
    raise ValueError(f"{model} needs sequences of at least {min_length} tokens; got input "
                     f"shape {shape}.")


def check_param_shape(module: nn.Module, path: Union[str, Sequence[str]],
                      expected: Sequence[int], what: str) -> None:
  """ValueError if the parameter at `path` has a shape other than `expected`.

  `path` is a parameter name of `module`, or names down from it.

  Catches inputs whose size does not match the size the model was built for
  (e.g. a ViT's position embeddings), with a message saying so. Does nothing
  while initialising or before the parameter exists.
  """
  if module.is_initializing():
    return
  path = (path,) if isinstance(path, str) else tuple(path)
  node: Any = module.variables.get("params", {})
  for name in path:
    if name not in node:
      return
    node = node[name]
  got = tuple(node.shape)
  if got != tuple(expected):
    raise ValueError(f"{type(module).__name__}: the input gives {what} of shape {tuple(expected)},"
                     f" but the parameters were built for {got}: use inputs of the size the "
                     "model was initialised with.")
