"""Samplers of mixing coefficients and the moments of their distributions.

All samplers are pure: `key` is a `jax.random` key, the output is float32 with
the requested `shape` (plus a trailing `k` axis for Dirichlet weights).
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from mixjax import checks

Shape = Sequence[int]

_ERM_HINT = " (alpha -> 0 is ERM: use the 'erm' policy for no mixing.)"


def _params(alpha: float, beta: Optional[float], names=("alpha", "beta")) -> tuple[float, float]:
  a = checks.positive_number(names[0], alpha, _ERM_HINT)
  b = a if beta is None else checks.positive_number(names[1], beta, _ERM_HINT)
  return a, b


def sample_beta(key: jax.Array, alpha: float, beta: Optional[float] = None,
                shape: Shape = (), dtype=jnp.float32) -> jax.Array:
  """`lam ~ Beta(alpha, beta)` (beta defaults to alpha): f32[shape] in [0, 1].

  In float32, draws within ~6e-8 of 1 round to exactly 1 (about 2% of them for
  alpha = 0.2); pass `dtype=jnp.float64` (with x64 enabled) to avoid that.
  """
  a, b = _params(alpha, beta)
  return jax.random.beta(key, a, b, tuple(shape), dtype=dtype)


def sample_dirichlet(key: jax.Array, alpha: float, k: int, shape: Shape = ()) -> jax.Array:
  """Weights `w ~ Dirichlet(alpha * 1_k)`: f32[*shape, k], rows sum to 1."""
  a = checks.positive_number("alpha", alpha, _ERM_HINT)
  if int(k) != k or k < 2:
    raise ValueError(f"k must be an integer >= 2 (number of mixed examples), got {k!r}.")
  return jax.random.dirichlet(key, jnp.full((int(k),), a, jnp.float32), tuple(shape),
                              dtype=jnp.float32)


def sample_untied(key: jax.Array, a: float, b: float, shape: Shape = (),
                  dtype=jnp.float32) -> jax.Array:
  """Input coefficient of the Untied-MixUp policy `U(Beta(a, b))`.

  The density is `(p(lam) + p(1 - lam)) / 2` with `p` the Beta(a, b) density:
  draw from Beta(a, b) and flip to `1 - lam` with probability 1/2. f32[shape].
  """
  a, b = _params(a, b, ("a", "b"))
  k_lam, k_flip = jax.random.split(key)
  lam = jax.random.beta(k_lam, a, b, tuple(shape), dtype=dtype)
  flip = jax.random.bernoulli(k_flip, 0.5, tuple(shape))
  return jnp.where(flip, 1.0 - lam, lam)


def untied_gamma(lam: jax.Array, a: float, b: float) -> jax.Array:
  """Label weight of `U(Beta(a, b))`: `p(lam) / (p(lam) + p(1 - lam))`.

  Equals `sigmoid((a - b) * logit(lam))`, which is how it is computed (stable at
  the end points). For `a == b` it is 1/2 everywhere. Same shape as `lam`.
  """
  a, b = _params(a, b, ("a", "b"))
  lam = jnp.asarray(lam, jnp.float32)
  if a == b:
    return jnp.full_like(lam, 0.5)
  logit = jnp.log(lam) - jnp.log1p(-lam)
  return jax.nn.sigmoid((a - b) * logit)


def expected_one_minus_lam(alpha: float, beta: Optional[float] = None) -> float:
  """`E[1 - lam]` for `lam ~ D_lam` of Beta(alpha, beta).

  `D_lam = a/(a+b) Beta(a+1, b) + b/(a+b) Beta(b+1, a)` (Zhang et al. 2021,
  Lemma 3.1). For `a == b` this is `1 - (a+1)/(2a+1)`.
  """
  a, b = _params(alpha, beta)
  s = a + b
  return 1.0 - (a * (a + 1) + b * (b + 1)) / (s * (s + 1))


def expected_sq_one_minus_lam(alpha: float, beta: Optional[float] = None) -> float:
  """`E[(1 - lam)^2]` for `lam ~ D_lam` of Beta(alpha, beta): `ab / ((a+b)(a+b+1))`."""
  a, b = _params(alpha, beta)
  s = a + b
  return a * b / (s * (s + 1))
