"""Mixing policies: how the input and label coefficients of a batch are drawn.

A policy is a function `policy(key, batch_size) -> Coefficients`; the Beta-based
ones carry `policy.beta_params = (a, b)`, the Beta(a, b) they draw from (MixupE
reads it for E[1 - lam]). `lam_x` is the
coefficient of the example itself in the mixed input (`lam*x_i + (1-lam)*x_j`),
`lam_y` the weight of its own label in the target (`gamma(lam)` for Untied MixUp,
1 for DAT, `lam` for mixup). Per-example policies give f32[B], per-batch ones a
scalar f32[].
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from mixjax import checks
from mixjax import sampling


class Coefficients(NamedTuple):
  """Mixing coefficients: `lam_x` for the inputs, `lam_y` for the labels (f32[B] or f32[])."""
  lam_x: jax.Array
  lam_y: jax.Array


Policy = Callable[[jax.Array, int], Coefficients]
Gamma = Callable[[jax.Array], jax.Array]


def _shape(batch_size: int, per_example: bool) -> tuple[int, ...]:
  return (int(batch_size),) if per_example else ()


def erm() -> Policy:
  """No mixing: both coefficients are 1."""
  def policy(key: jax.Array, batch_size: int) -> Coefficients:
    del key
    one = jnp.ones((int(batch_size),), jnp.float32)
    return Coefficients(one, one)
  return policy


def mixup(alpha: float, beta: Optional[float] = None, per_example: bool = True) -> Policy:
  """mixup (Zhang et al. 2018): `lam ~ Beta(alpha, beta)` for inputs and labels."""
  sampling.sample_beta(jax.random.key(0), alpha, beta)  # Validates eagerly.

  def policy(key: jax.Array, batch_size: int) -> Coefficients:
    lam = sampling.sample_beta(key, alpha, beta, _shape(batch_size, per_example))
    return Coefficients(lam, lam)
  policy.beta_params = (float(alpha), float(alpha if beta is None else beta))
  return policy


def untied_mixup(a: float, b: float, per_example: bool = True) -> Policy:
  """Untied MixUp with the policy `U(Beta(a, b))` (Archambault et al. 2019).

  The input coefficient has density `(p(lam) + p(1-lam)) / 2`, the label weight
  is `gamma(lam) = p(lam) / (p(lam) + p(1-lam))`, `p` the Beta(a, b) density.
  """
  sampling.untied_gamma(jnp.float32(0.5), a, b)  # Validates eagerly.

  def policy(key: jax.Array, batch_size: int) -> Coefficients:
    lam = sampling.sample_untied(key, a, b, _shape(batch_size, per_example))
    return Coefficients(lam, sampling.untied_gamma(lam, a, b))
  policy.beta_params = (float(a), float(b))
  return policy


def weighted(policy: Policy, gamma: Gamma) -> Policy:
  """Replaces the label weight of `policy` by `gamma(coefficients.lam_x)`.

  `gamma` maps [0, 1] to [0, 1] elementwise (any jnp-traceable callable). It is
  checked on a grid of 101 points when the policy is built and, for concrete
  values, on every draw; traced draws are checked inside `checks.traced_checks`.
  """
  if not callable(gamma):
    raise ValueError(f"gamma must be a callable mapping [0, 1] -> [0, 1], got {gamma!r}.")
  grid = np.asarray(gamma(jnp.linspace(0.0, 1.0, 101, dtype=jnp.float32)))
  if grid.shape != (101,) or not np.all((grid >= 0) & (grid <= 1)):
    raise ValueError(
        "gamma must map [0, 1] elementwise into [0, 1]; on a grid of [0, 1] it "
        f"returned values in [{np.nanmin(grid):.4g}, {np.nanmax(grid):.4g}] "
        f"(NaN: {bool(np.isnan(grid).any())}, shape {grid.shape}).")

  def new_policy(key: jax.Array, batch_size: int) -> Coefficients:
    c = policy(key, batch_size)
    y = jnp.asarray(gamma(c.lam_x), jnp.float32)
    checks.in_unit_interval("gamma(lam)", y)
    return Coefficients(c.lam_x, y)
  if hasattr(policy, "beta_params"):
    new_policy.beta_params = policy.beta_params
  return new_policy


def dat(alpha: float, beta: Optional[float] = None, per_example: bool = True) -> Policy:
  """Directional Adversarial Training: mix inputs with Beta(alpha, beta), keep the label of `x_i`."""
  return weighted(mixup(alpha, beta, per_example), jnp.ones_like)


_REGISTRY = {"erm": erm, "mixup": mixup, "untied": untied_mixup, "dat": dat}


def get_policy(name: str, **kwargs) -> Policy:
  """Builds a policy by name: one of 'erm', 'mixup', 'untied', 'dat'."""
  if name not in _REGISTRY:
    raise ValueError(f"Unknown policy {name!r}; choose one of {sorted(_REGISTRY)}.")
  return _REGISTRY[name](**kwargs)


PolicyLike = Union[str, Policy]
