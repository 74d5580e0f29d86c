"""Samplers of mixing coefficients and the moments of their distributions.

All samplers are pure and take the PRNG key first: `sampler(key, params...,
shape)` (the convention of every sampler, policy and pairing in mixjax). `key`
is a `jax.random` key, the output is float32 with the requested `shape` (plus a
trailing `k` axis for Dirichlet weights).

Distribution parameters (`alpha`, `beta`) are data: Python numbers, concrete
scalars or traced scalars. Concrete values are checked at once (ValueError);
traced ones are checked only under `checks.checked(fn)`. A function jitted
over `alpha` therefore compiles once for every value of it.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from mixjax import checks

Shape = Sequence[int]
Scalar = Union[float, jax.Array]
"""A Python number or a float scalar array (concrete or traced)."""

_ERM_HINT = " (alpha -> 0 is ERM: use the 'erm' policy for no mixing.)"


def _positive(name: str, value: Any) -> Scalar:
  """`value` as a float if concrete (raising unless finite and > 0), else unchanged."""
  if checks.is_traced(value):
    checks.check_array(value, lambda v: jnp.isfinite(v) & (v > 0),
                       f"{name} must be a finite number > 0.{_ERM_HINT}")
    return value
  return checks.positive_number(name, value, _ERM_HINT)


def resolve_beta(alpha: Scalar, beta: Optional[Scalar] = None) -> tuple[Scalar, Scalar]:
  """The parameters `(alpha, beta)` of a Beta(alpha, beta), `beta` defaulting to `alpha`.

  Concrete values come back as Python floats and raise ValueError (naming
  `alpha` or `beta`) unless they are finite and > 0; traced scalars come back
  unchanged (checked under `checks.checked`).
  """
  a = _positive("alpha", alpha)
  b = a if beta is None else _positive("beta", beta)
  return a, b


def sample_beta(key: jax.Array, alpha: Scalar, beta: Optional[Scalar] = None,
                shape: Shape = (), dtype=jnp.float32) -> jax.Array:
  """`lam ~ Beta(alpha, beta)` (beta defaults to alpha): f32[shape] in [0, 1].

  In float32, draws within ~6e-8 of 1 round to exactly 1 (about 2% of them for
  alpha = 0.2); pass `dtype=jnp.float64` (with x64 enabled) to avoid that.
  """
  a, b = resolve_beta(alpha, beta)
  return jax.random.beta(key, a, b, tuple(shape), dtype=dtype)


def sample_dirichlet(key: jax.Array, alpha: Scalar, k: int, shape: Shape = ()) -> jax.Array:
  """Weights `w ~ Dirichlet(alpha * 1_k)`: f32[*shape, k], rows sum to 1."""
  a = _positive("alpha", alpha)
  if int(k) != k or k < 2:
    raise ValueError(f"k must be an integer >= 2 (number of mixed examples), got {k!r}.")
  return jax.random.dirichlet(key, jnp.full((int(k),), a, jnp.float32), tuple(shape),
                              dtype=jnp.float32)


def sample_untied(key: jax.Array, alpha: Scalar, beta: Scalar, shape: Shape = (),
                  dtype=jnp.float32) -> jax.Array:
  """Input coefficient of the Untied-MixUp policy `U(Beta(alpha, beta))`.

  The density is `(p(lam) + p(1 - lam)) / 2` with `p` the Beta(alpha, beta)
  density: draw from Beta(alpha, beta) and flip to `1 - lam` with probability
  1/2. f32[shape].
  """
  a, b = resolve_beta(alpha, beta)
  k_lam, k_flip = jax.random.split(key)
  lam = jax.random.beta(k_lam, a, b, tuple(shape), dtype=dtype)
  flip = jax.random.bernoulli(k_flip, 0.5, tuple(shape))
  return jnp.where(flip, 1.0 - lam, lam)


def untied_gamma(lam: jax.Array, alpha: Scalar, beta: Scalar) -> jax.Array:
  """Label weight of `U(Beta(alpha, beta))`: `p(lam) / (p(lam) + p(1 - lam))`.

  Equals `sigmoid((alpha - beta) * logit(lam))`, which is how it is computed
  (stable at the end points). For `alpha == beta` it is 1/2 everywhere.
  `lam`: f32[...]; returns f32 of the same shape. With Python-number parameters
  `alpha - beta` is taken in float64, with traced ones in float32 (results may
  differ in the last bit).
  """
  a, b = resolve_beta(alpha, beta)
  lam = jnp.asarray(lam, jnp.float32)
  checks.in_unit_interval("lam (the input coefficient of untied_gamma)", lam)
  if not (checks.is_traced(a) or checks.is_traced(b)) and a == b:
    return jnp.full_like(lam, 0.5)
  d = a - b
  logit = jnp.log(lam) - jnp.log1p(-lam)
  # For traced alpha == beta, d == 0: mask the infinite logits of lam in {0, 1}
  # so that 0 * inf gives no NaN and the result is exactly 1/2.
  logit = jnp.where(d == 0, 0.0, logit) if checks.is_traced(d) else logit
  return jax.nn.sigmoid(d * logit)


def expected_one_minus_lam(alpha: Scalar, beta: Optional[Scalar] = None) -> Scalar:
  """`E[1 - lam]` for `lam ~ D_lam` of Beta(alpha, beta).

  `D_lam = a/(a+b) Beta(a+1, b) + b/(a+b) Beta(b+1, a)` (Zhang et al. 2021,
  Lemma 3.1). For `a == b` this is `1 - (a+1)/(2a+1)`. A float for concrete
  parameters, a traced f32[] for traced ones.
  """
  a, b = resolve_beta(alpha, beta)
  s = a + b
  return 1.0 - (a * (a + 1) + b * (b + 1)) / (s * (s + 1))


def expected_sq_one_minus_lam(alpha: Scalar, beta: Optional[Scalar] = None) -> Scalar:
  """`E[(1 - lam)^2]` for `lam ~ D_lam` of Beta(alpha, beta): `ab / ((a+b)(a+b+1))`."""
  a, b = resolve_beta(alpha, beta)
  s = a + b
  return a * b / (s * (s + 1))
