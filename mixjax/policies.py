"""Mixing policies: how the input and label coefficients of a batch are drawn.

A policy is a callable `policy(key, batch_size) -> Coefficients`, the PRNG key
first (the convention of every sampler, policy and pairing in mixjax). `lam_x`
is the coefficient of the example itself in the mixed input
(`lam*x_i + (1-lam)*x_j`), `lam_y` the weight of its own label in the target
(`gamma(lam)` for Untied MixUp, 1 for DAT, `lam` for mixup). Per-example
policies give f32[B], per-batch ones a scalar f32[].

The policies here are frozen dataclasses registered as pytrees: `alpha` and
`beta` are leaves (data), the structural settings (`per_example`, `gamma`) are
static. A policy can be built and called under `jit`, and passed to a jitted
function as an argument, where a sweep over `alpha` compiles once::

    f = jax.jit(lambda pol, key: pol(key, 8))
    f(mixup(0.2), key); f(mixup(1.0), key)   # One compilation.

Every policy that draws from a Beta exposes `.alpha` and `.beta` (beta
resolved, never None), e.g. for MixupE's E[1 - lam]. Concrete parameters are
validated when the policy is built (ValueError); traced ones are not, and
unflattening a policy (as JAX does with tracers) never re-validates. A default
`beta` is resolved when built: `dataclasses.replace(mixup(0.2), alpha=0.5)`
keeps beta = 0.2; build `mixup(0.5)` for Beta(0.5, 0.5).

The first-order weight of a policy is `E[lam_y (1 - lam_x) + (1 - lam_y) lam_x]`:
writing example i's mixed loss as the loss of an example with i's label only
(the DAT form: with probability `lam_y` the mix `lam_x x_i + (1 - lam_x) x_j`
keeps label i, else it is the mix `(1 - lam_x) x_j + lam_x x_i` with label
j), it is the expected coefficient of the partner, which weighs the
first-order (directional-derivative) term of the loss's expansion (MixupE's
`E_{D_lam}[1 - lam]`). `first_order_weight()` gives it in closed form.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from mixjax import checks
from mixjax import sampling
from mixjax.sampling import Scalar


class Coefficients(NamedTuple):
  """Mixing coefficients: `lam_x` for the inputs, `lam_y` for the labels (f32[B] or f32[])."""
  lam_x: jax.Array
  lam_y: jax.Array


Policy = Callable[[jax.Array, int], Coefficients]
Gamma = Callable[[jax.Array], jax.Array]


def _pytree(data: tuple[str, ...], meta: tuple[str, ...]):
  """Registers a frozen dataclass as a pytree with `data` leaves and static `meta`.

  Unflattening sets the fields directly, without `__init__`/`__post_init__`, so
  JAX can rebuild a policy from tracers (or any placeholder) without validation.
  """
  def register(cls):
    fields = {f.name for f in dataclasses.fields(cls)}
    if fields != set(data) | set(meta) or set(data) & set(meta):
      raise TypeError(f"{cls.__name__}: data {data} and meta {meta} must partition {fields}.")

    def flatten_with_keys(p):
      return (tuple((jax.tree_util.GetAttrKey(n), getattr(p, n)) for n in data),
              tuple(getattr(p, n) for n in meta))

    def flatten(p):
      return tuple(getattr(p, n) for n in data), tuple(getattr(p, n) for n in meta)

    def unflatten(aux, children):
      p = object.__new__(cls)
      for name, value in zip(meta + data, tuple(aux) + tuple(children)):
        object.__setattr__(p, name, value)
      return p

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls
  return register


def _shape(batch_size: int, per_example: bool) -> tuple[int, ...]:
  return (int(batch_size),) if per_example else ()


def _set_beta_params(p: Any, beta_required: bool) -> None:
  """Validates and resolves `p.alpha`, `p.beta` (beta defaults to alpha) and `p.per_example`."""
  if beta_required and p.beta is None:
    raise ValueError(f"{type(p).__name__} needs beta (a number > 0), got beta=None.")
  alpha, beta = sampling.resolve_beta(p.alpha, p.beta)
  object.__setattr__(p, "alpha", alpha)
  object.__setattr__(p, "beta", beta)
  object.__setattr__(p, "per_example", bool(p.per_example))


@_pytree(data=(), meta=())
@dataclasses.dataclass(frozen=True)
class Erm:
  """No mixing: both coefficients are 1, f32[B] (for any `per_example`)."""

  def __call__(self, key: jax.Array, batch_size: int) -> Coefficients:
    del key
    one = jnp.ones((int(batch_size),), jnp.float32)
    return Coefficients(one, one)

  def first_order_weight(self) -> float:
    """0: no partner."""
    return 0.0


@_pytree(data=("alpha", "beta"), meta=("per_example",))
@dataclasses.dataclass(frozen=True)
class Mixup:
  """mixup (Zhang et al. 2018): `lam ~ Beta(alpha, beta)` for inputs and labels.

  alpha, beta: float or f32[] (beta defaults to alpha). per_example: one `lam`
  per example (f32[B]) or one per batch (f32[]).
  """
  alpha: Scalar
  beta: Optional[Scalar] = None
  per_example: bool = True

  def __post_init__(self):
    _set_beta_params(self, beta_required=False)

  def __call__(self, key: jax.Array, batch_size: int) -> Coefficients:
    lam = sampling.sample_beta(key, self.alpha, self.beta, _shape(batch_size, self.per_example))
    return Coefficients(lam, lam)

  def first_order_weight(self) -> float:
    """`E[2 lam (1 - lam)] = 2ab / ((a+b)(a+b+1))` = `E_{D_lam}[1 - lam]` (Zhang et al. 2021)."""
    return sampling.expected_one_minus_lam(self.alpha, self.beta)


@_pytree(data=("alpha", "beta"), meta=("per_example",))
@dataclasses.dataclass(frozen=True)
class UntiedMixup:
  """Untied MixUp with the policy `U(Beta(alpha, beta))` (Archambault et al. 2019).

  The input coefficient has density `(p(lam) + p(1-lam)) / 2`, the label weight
  is `gamma(lam) = p(lam) / (p(lam) + p(1-lam))`, `p` the Beta(alpha, beta)
  density. alpha, beta: float or f32[]; coefficients f32[B] (per_example) or f32[].
  """
  alpha: Scalar
  beta: Scalar
  per_example: bool = True

  def __post_init__(self):
    _set_beta_params(self, beta_required=True)

  def __call__(self, key: jax.Array, batch_size: int) -> Coefficients:
    lam = sampling.sample_untied(key, self.alpha, self.beta, _shape(batch_size, self.per_example))
    return Coefficients(lam, sampling.untied_gamma(lam, self.alpha, self.beta))

  def first_order_weight(self) -> float:
    """`b / (a + b)`: U(Beta(a, b)) is DAT with Beta(a, b) (Archambault et al., Lemma 4).

    With `u = lam_x`, density `(p(u) + p(1-u)) / 2`, and `gamma = p(u) / (p(u) +
    p(1-u))`: `E[gamma (1-u) + (1-gamma) u] = 1/2 int [p(u)(1-u) + p(1-u) u] du
    = int p(u) (1-u) du = E_{Beta(a,b)}[1 - lam] = b / (a + b)`.
    """
    return float(self.beta) / (float(self.alpha) + float(self.beta))


@_pytree(data=("alpha", "beta"), meta=("per_example",))
@dataclasses.dataclass(frozen=True)
class Dat:
  """Directional Adversarial Training: inputs mixed with `lam ~ Beta(alpha, beta)`, label of `x_i`.

  `lam_x` as in `Mixup`, `lam_y` = 1 (f32[B] per_example, else f32[]). This is
  `Weighted(Mixup(alpha, beta, per_example), jnp.ones_like)` as its own class.
  """
  alpha: Scalar
  beta: Optional[Scalar] = None
  per_example: bool = True

  def __post_init__(self):
    _set_beta_params(self, beta_required=False)

  def __call__(self, key: jax.Array, batch_size: int) -> Coefficients:
    lam = sampling.sample_beta(key, self.alpha, self.beta, _shape(batch_size, self.per_example))
    return Coefficients(lam, jnp.ones_like(lam))

  def first_order_weight(self) -> float:
    """`E_{Beta(a,b)}[1 - lam] = b / (a + b)` (`lam_y` = 1)."""
    return float(self.beta) / (float(self.alpha) + float(self.beta))


def _check_gamma(gamma: Any) -> None:
  """Raises unless `gamma` maps a grid of 101 points of [0, 1] into [0, 1].

  The grid is evaluated with concrete values even under `jit`; a `gamma` that
  closes over traced values is left to the per-draw check.
  """
  if not callable(gamma):
    raise ValueError(f"gamma must be a callable mapping [0, 1] -> [0, 1], got {gamma!r}.")
  with jax.ensure_compile_time_eval():
    grid = gamma(jnp.linspace(0.0, 1.0, 101, dtype=jnp.float32))
  if checks.is_traced(grid):
    return
  grid = np.asarray(grid)
  if grid.shape != (101,) or not np.all((grid >= 0) & (grid <= 1)):
    raise ValueError(
        "gamma must map [0, 1] elementwise into [0, 1]; on a grid of [0, 1] it "
        f"returned values in [{np.nanmin(grid):.4g}, {np.nanmax(grid):.4g}] "
        f"(NaN: {bool(np.isnan(grid).any())}, shape {grid.shape}).")


@_pytree(data=("policy",), meta=("gamma",))
@dataclasses.dataclass(frozen=True)
class Weighted:
  """`policy` with its label weight replaced by `gamma(coefficients.lam_x)`.

  policy: any policy (its pytree leaves are this one's). gamma: static callable
  mapping [0, 1] to [0, 1] elementwise (jnp-traceable). It is checked on a grid
  of 101 points when built and, for concrete values, on every draw; traced
  draws are checked inside `checks.traced_checks`. `.alpha`/`.beta` are those
  of `policy` (AttributeError if it has none).
  """
  policy: Policy
  gamma: Gamma

  def __post_init__(self):
    _check_gamma(self.gamma)

  @property
  def alpha(self) -> Scalar:
    return self.policy.alpha

  @property
  def beta(self) -> Scalar:
    return self.policy.beta

  def __call__(self, key: jax.Array, batch_size: int) -> Coefficients:
    c = self.policy(key, batch_size)
    y = jnp.asarray(self.gamma(c.lam_x), jnp.float32)
    checks.in_unit_interval("gamma(lam)", y)
    return Coefficients(c.lam_x, y)

  def first_order_weight(self) -> float:
    """No closed form for an arbitrary `gamma`: ValueError saying what to pass instead."""
    raise ValueError("Weighted(policy, gamma) has no closed-form first-order weight "
                     "E[lam_y (1 - lam_x) + (1 - lam_y) lam_x] for an arbitrary gamma: pass it "
                     "to mixupe as weight=<value> (e.g. a Monte Carlo estimate from the policy's "
                     "draws).")


def erm() -> Erm:
  """No mixing: both coefficients are 1 (see `Erm`)."""
  return Erm()


def mixup(alpha: Scalar, beta: Optional[Scalar] = None, per_example: bool = True) -> Mixup:
  """mixup (Zhang et al. 2018): `lam ~ Beta(alpha, beta)` for inputs and labels (see `Mixup`)."""
  return Mixup(alpha, beta, per_example)


def untied_mixup(alpha: Scalar, beta: Scalar, per_example: bool = True) -> UntiedMixup:
  """Untied MixUp with the policy `U(Beta(alpha, beta))` (see `UntiedMixup`)."""
  return UntiedMixup(alpha, beta, per_example)


def weighted(policy: Policy, gamma: Gamma) -> Weighted:
  """Replaces the label weight of `policy` by `gamma(coefficients.lam_x)` (see `Weighted`)."""
  return Weighted(policy, gamma)


def dat(alpha: Scalar, beta: Optional[Scalar] = None, per_example: bool = True) -> Dat:
  """Directional Adversarial Training: mix inputs with Beta(alpha, beta), keep the label of `x_i`."""
  return Dat(alpha, beta, per_example)


_REGISTRY = {"erm": erm, "mixup": mixup, "untied": untied_mixup, "dat": dat}


def get_policy(name: str, **kwargs) -> Policy:
  """Builds a policy by name: one of 'erm', 'mixup', 'untied', 'dat'."""
  if name not in _REGISTRY:
    raise ValueError(f"Unknown policy {name!r}; choose one of {sorted(_REGISTRY)}.")
  return _REGISTRY[name](**kwargs)


PolicyLike = Union[str, Policy]
