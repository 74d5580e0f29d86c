"""Target-linear per-example losses and the mixup loss.

A loss `l(outputs, targets)` is target-linear when
`l(z, s*t1 + u*t2) = s*l(z, t1) + u*l(z, t2)`; for such losses training on
mixed targets equals interpolating the losses (Archambault et al. 2019). All
losses here are target-linear, take f[B, ...] outputs and f32[B, C] targets,
and return f32[B].
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from mixjax import checks

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check_targets(name: str, outputs: jax.Array, targets: jax.Array) -> None:
  """Targets must be float f[B, C] matching the outputs (no silent broadcasting)."""
  if not jnp.issubdtype(jnp.result_type(targets), jnp.floating):
    raise ValueError(f"{name}: targets must be float f32[B, C] (one-hot or soft), got dtype "
                     f"{jnp.result_type(targets)}; turn class ids into targets with "
                     f"mixjax.to_targets(labels, num_classes).")
  if jnp.shape(targets) != jnp.shape(outputs):
    raise ValueError(f"{name}: targets of shape {jnp.shape(targets)} do not match the outputs' "
                     f"shape {jnp.shape(outputs)}; both must be [B, C].")


def softmax_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """`-sum_c t_c log softmax(z)_c`: f32[B] from logits f[B, C], targets f32[B, C]."""
  _check_targets("softmax_cross_entropy", logits, targets)
  return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def sigmoid_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-class binary cross-entropy summed over classes: f32[B] (logits, targets f[B, C])."""
  _check_targets("sigmoid_cross_entropy", logits, targets)
  z = logits.astype(jnp.float32)
  return -jnp.sum(targets * jax.nn.log_sigmoid(z) + (1 - targets) * jax.nn.log_sigmoid(-z),
                  axis=-1)


def class_embeddings(key: jax.Array, num_classes: int, dim: int) -> jax.Array:
  """Fixed random unit vectors, one per class: f32[C, d] (negative-cosine loss)."""
  if num_classes < 2 or dim < 1:
    raise ValueError(f"need num_classes >= 2 and dim >= 1, got {num_classes}, {dim}.")
  e = jax.random.normal(key, (num_classes, dim), jnp.float32)
  return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


def negative_cosine(features: jax.Array, targets: jax.Array, embeddings: jax.Array) -> jax.Array:
  """`-v . (targets @ E)` with `v = features / |features|`.

  Args:
    features: f[B, d] outputs of a linear head.
    targets: f32[B, C]; embeddings: f32[C, d] (`class_embeddings`).
  Returns: f32[B].
  """
  v = features.astype(jnp.float32)
  v = v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
  return -jnp.sum(v * (targets @ embeddings), axis=-1)


def cosine_logits(features: jax.Array, embeddings: jax.Array) -> jax.Array:
  """Class scores `v . e_c` for prediction with a negative-cosine head: f32[B, C]."""
  v = features.astype(jnp.float32)
  v = v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
  return v @ embeddings.T


class NegativeCosineLoss(NamedTuple):
  """`negative_cosine` with fixed `embeddings` f32[C, d], as a `LossFn`.

  The loss depends on the features only through their direction
  (`scale_invariant`): its gradient is orthogonal to the features.
  """
  embeddings: jax.Array
  scale_invariant: bool = True

  def __call__(self, features: jax.Array, targets: jax.Array) -> jax.Array:
    return negative_cosine(features, targets, self.embeddings)


def negative_cosine_loss(embeddings: jax.Array) -> LossFn:
  """`negative_cosine` with fixed `embeddings`, as a `LossFn` (a `NegativeCosineLoss`)."""
  return NegativeCosineLoss(embeddings)


def mixup_loss(loss_fn: LossFn, outputs: jax.Array, targets_a: jax.Array, targets_b: jax.Array,
               lam: jax.Array, interpolate: bool = True) -> jax.Array:
  """Per-example mixup loss, f32[B].

  interpolate=True: `lam * l(o, t_a) + (1 - lam) * l(o, t_b)`;
  interpolate=False: `l(o, lam * t_a + (1 - lam) * t_b)`. The two are equal
  for target-linear losses. `lam`: f32[] or f32[B] (the label coefficient).
  """
  lam = jnp.asarray(lam, jnp.float32)
  if lam.ndim > 1 or (lam.ndim == 1 and lam.shape[0] != jnp.shape(targets_a)[0]):
    raise ValueError(f"lam must be f32[] or f32[B] with B = {jnp.shape(targets_a)[0]}, got shape "
                     f"{lam.shape}.")
  checks.in_unit_interval("lam (the label coefficient of mixup_loss)", lam)
  if interpolate:
    return lam * loss_fn(outputs, targets_a) + (1 - lam) * loss_fn(outputs, targets_b)
  lam_c = lam.reshape(lam.shape + (1,) * (targets_a.ndim - lam.ndim))
  return loss_fn(outputs, lam_c * targets_a + (1 - lam_c) * targets_b)


_REGISTRY = {"softmax_xent": softmax_cross_entropy, "sigmoid_xent": sigmoid_cross_entropy}
LOSSES = tuple(_REGISTRY)  # Names `get_loss` takes.


def get_loss(name: str) -> LossFn:
  """'softmax_xent' or 'sigmoid_xent' (negative-cosine needs embeddings: `negative_cosine_loss`)."""
  if name not in _REGISTRY:
    raise ValueError(f"Unknown loss {name!r}; choose one of {sorted(_REGISTRY)}.")
  return _REGISTRY[name]
