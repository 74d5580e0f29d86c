"""Target-linear per-example losses and the mixup loss.

A loss `l(outputs, targets)` is target-linear when
`l(z, s*t1 + u*t2) = s*l(z, t1) + u*l(z, t2)`; for such losses training on
mixed targets equals interpolating the losses (Archambault et al. 2019). All
losses here but `BinaryCrossEntropy` with a threshold are target-linear, take f[B, ...] outputs and f32[B, C] targets,
and return f32[B].
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

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


class BinaryCrossEntropy(NamedTuple):
  """timm's `BinaryCrossEntropy` ("ResNet strikes back"): per-class BCE on (mixed) targets.

  `l(z, t) = mean_c [-t'_c log sigmoid(z_c) - (1 - t'_c) log sigmoid(-z_c)]`,
  f32[B] from logits f[B, C] and targets f32[B, C], where `t' = t` or, with a
  `threshold`, `t' = 1[t > threshold]` (strictly greater, as timm's
  `target.gt(threshold)`): every class of a mixed target heavier than the
  threshold becomes a positive. The mean over classes is timm's
  `reduction='mean'` per example (`sigmoid_cross_entropy` sums instead).

  With a threshold the loss is not target-linear (`target_linear` False), so
  it must see the mixed targets: `methods.get_objective` then mixes targets
  (`interpolate=False`). Label smoothing happens before mixing and
  thresholding (`mixing.to_targets`), as in timm.
  """
  threshold: Optional[float] = None

  @property
  def target_linear(self) -> bool:
    return self.threshold is None

  def __call__(self, logits: jax.Array, targets: jax.Array) -> jax.Array:
    _check_targets("binary_cross_entropy", logits, targets)
    t = targets.astype(jnp.float32)
    if self.threshold is not None:
      t = (t > self.threshold).astype(jnp.float32)
    z = logits.astype(jnp.float32)
    return -jnp.mean(t * jax.nn.log_sigmoid(z) + (1 - t) * jax.nn.log_sigmoid(-z), axis=-1)


def binary_cross_entropy(threshold: Optional[float] = None) -> BinaryCrossEntropy:
  """A `BinaryCrossEntropy` loss; `threshold` None or in [0, 1)."""
  if threshold is not None and not 0.0 <= float(threshold) < 1.0:
    raise ValueError(f"binary_cross_entropy threshold must be None (soft targets) or in [0, 1) "
                     f"(targets > threshold become 1; timm uses 0.2), got {threshold!r}.")
  return BinaryCrossEntropy(None if threshold is None else float(threshold))


def is_target_linear(loss_fn: LossFn) -> bool:
  """Whether `loss_fn(z, s t1 + u t2) = s l(z, t1) + u l(z, t2)` (True unless it says otherwise)."""
  return bool(getattr(loss_fn, "target_linear", True))


_REGISTRY = {"softmax_xent": softmax_cross_entropy, "sigmoid_xent": sigmoid_cross_entropy,
             "bce": binary_cross_entropy}
LOSSES = tuple(_REGISTRY)  # Names `get_loss` takes.


def get_loss(name: str, threshold: Optional[float] = None) -> LossFn:
  """A loss by name: 'softmax_xent', 'sigmoid_xent' or 'bce' (`binary_cross_entropy(threshold)`).

  threshold: only for 'bce'. Negative-cosine needs embeddings: `negative_cosine_loss`.
  """
  if name not in _REGISTRY:
    raise ValueError(f"Unknown loss {name!r}; choose one of {sorted(_REGISTRY)}.")
  if name == "bce":
    return binary_cross_entropy(threshold)
  if threshold is not None:
    raise ValueError(f"loss {name!r} takes no threshold (got threshold={threshold!r}); the "
                     "target threshold belongs to loss 'bce'.")
  return _REGISTRY[name]
