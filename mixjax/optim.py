"""Learning-rate schedules, optimizers with weight-decay masks, Polyak EMA."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

PyTree = Any

_NO_DECAY_NAMES = ("bias", "scale", "embedding_norm")


def make_schedule(config: ml_collections.ConfigDict, total_steps: int,
                  steps_per_epoch: float) -> optax.Schedule:
  """The learning rate as a function of the step.

  config: `config.schedule` fields plus the peak `lr`.
    warmup_cosine: linear warm-up from `warmup_init*lr` to `lr`, then cosine
      decay to `end_factor*lr` at `total_steps` (MixupE ImageNet recipe).
    piecewise: linear warm-up, then `lr` multiplied by `decay_factor` at each
      of `boundaries_epochs` (Goyal et al. / mixup paper recipes).
    constant: `lr` after the warm-up.
  """
  s, lr = config.schedule, float(config.optimizer.lr)
  warmup = int(s.warmup_steps or round(s.warmup_epochs * steps_per_epoch))
  if warmup >= total_steps and s.name == "warmup_cosine":
    raise ValueError(f"schedule warm-up ({warmup} steps) must be shorter than total_steps "
                     f"({total_steps}): lower config.schedule.warmup_steps (or warmup_epochs; "
                     f"{steps_per_epoch:g} steps per epoch here) or raise config.total_steps.")
  init = s.warmup_init * lr
  if s.name == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(init, lr, warmup, total_steps, lr * s.end_factor)
  if s.name == "constant":
    after = optax.constant_schedule(lr)
  elif s.name == "piecewise":
    bounds = {int(round(e * steps_per_epoch)) - warmup: s.decay_factor
              for e in s.boundaries_epochs}
    after = optax.piecewise_constant_schedule(lr, bounds)
  else:
    raise ValueError(f"schedule.name={s.name!r}; choose warmup_cosine, piecewise or constant.")
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(init, lr, warmup), after], [warmup])


def decay_mask(params: PyTree, decay_norm_and_bias: bool = False) -> PyTree:
  """True for leaves that get weight decay: kernels/embeddings, not biases or norm scales.

  A leaf is excluded if it is 1-D (biases, norm scales/offsets) or its name is
  one of 'bias', 'scale'.
  """
  def keep(path, leaf):
    if decay_norm_and_bias:
      return True
    name = str(getattr(path[-1], "key", path[-1])) if path else ""
    return bool(jnp.ndim(leaf) > 1 and name not in _NO_DECAY_NAMES)
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule,
                   ) -> optax.GradientTransformation:
  """Optimizer from `config.optimizer` (sgd with momentum, adamw, adam) + clipping.

  Weight decay: for 'sgd' an L2 term `wd * w` added to the gradient before
  momentum (the ResNet convention); for 'adamw' decoupled decay scaled by the
  lr; for 'adam' L2 added to the gradient. Norm and bias parameters are masked
  out unless `decay_norm_and_bias`.
  """
  o = config.optimizer
  mask = lambda p: decay_mask(p, o.decay_norm_and_bias)  # noqa: E731
  chain = []
  if o.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(o.grad_clip_norm))
  if o.name == "sgd":
    if o.weight_decay:
      chain.append(optax.add_decayed_weights(o.weight_decay, mask))
    chain.append(optax.sgd(schedule, momentum=o.momentum or None, nesterov=o.nesterov))
  elif o.name == "adamw":
    chain.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                             weight_decay=o.weight_decay, mask=mask))
  elif o.name == "adam":
    if o.weight_decay:
      chain.append(optax.add_decayed_weights(o.weight_decay, mask))
    chain.append(optax.adam(schedule, b1=o.b1, b2=o.b2, eps=o.eps))
  else:
    raise ValueError(f"optimizer.name={o.name!r}; choose one of sgd, adamw, adam.")
  return optax.chain(*chain)


def ema_update(ema: PyTree, new: PyTree, decay: float) -> PyTree:
  """Polyak average `decay * ema + (1 - decay) * new`, leaf by leaf (in the ema's dtype)."""
  return jax.tree_util.tree_map(
      lambda e, n: (decay * e + (1.0 - decay) * n.astype(e.dtype)).astype(e.dtype), ema, new)
