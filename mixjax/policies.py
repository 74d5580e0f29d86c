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


@dataclasses.dataclass(frozen=True)
class _BetaInputs:
  """`lam_x ~ Beta(alpha, beta)` (`Mixup`, `Dat`); a subclass defines the label weight `_lam_y(lam)`."""
  alpha: Scalar
  beta: Optional[Scalar] = None
  per_example: bool = True

  def __post_init__(self):
    _set_beta_params(self, beta_required=False)

  def __call__(self, key: jax.Array, batch_size: int) -> Coefficients:
    lam = sampling.sample_beta(key, self.alpha, self.beta, _shape(batch_size, self.per_example))
    return Coefficients(lam, self._lam_y(lam))


@_pytree(data=("alpha", "beta"), meta=("per_example",))
class Mixup(_BetaInputs):
  """mixup (Zhang et al. 2018): `lam ~ Beta(alpha, beta)` for inputs and labels.

  alpha, beta: float or f32[] (beta defaults to alpha). per_example: one `lam`
  per example (f32[B]) or one per batch (f32[]).
  """

  def _lam_y(self, lam: jax.Array) -> jax.Array:
    return lam

  def first_order_weight(self) -> float:
    """`E[2 lam (1 - lam)] = 2ab / ((a+b)(a+b+1))` = `E_{D_lam}[1 - lam]` (Zhang et al. 2021)."""
    return sampling.expected_one_minus_lam(self.alpha, self.beta)


@_pytree(data=("alpha", "beta"), meta=("per_example",))
class Dat(_BetaInputs):
  """Directional Adversarial Training: inputs mixed with `lam ~ Beta(alpha, beta)`, label of `x_i`.

  `lam_x` as in `Mixup` (the same draw for the same key), `lam_y` = 1 (f32[B]
  per_example, else f32[]): `Weighted(Mixup(alpha, beta, per_example),
  jnp.ones_like)` with a closed-form first-order weight.
  """

  def _lam_y(self, lam: jax.Array) -> jax.Array:
    return jnp.ones_like(lam)

  def first_order_weight(self) -> float:
    """`E_{Beta(a,b)}[1 - lam] = b / (a + b)` (`lam_y` = 1)."""
    return float(self.beta) / (float(self.alpha) + float(self.beta))


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
  draws are checked under `checks.checked`. `.alpha`/`.beta` are those
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


def _check_prob(name: str, value: Any) -> Any:
  """`value` in [0, 1] (concrete values only; traced ones are left to the caller)."""
  if not checks.is_traced(value) and not 0.0 <= float(value) <= 1.0:
    raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}.")
  return value


@_pytree(data=("alpha", "mixup_alpha", "switch_prob", "apply_prob"),
         meta=("image_shape", "per_example", "correct_lam", "minmax"))
@dataclasses.dataclass(frozen=True)
class CutMix:
  """CutMix (Yun et al. 2019), optionally switching with mixup, as timm's `Mixup` does.

  The input coefficient is a mask, not a number: `lam_x` is f32[B, H, W, 1],
  1 where the example keeps its own pixels and 0 inside the box pasted from its
  partner, so `mixing.mix_with_partner` (which broadcasts `lam` over the
  non-batch axes) makes the CutMix image and every objective works unchanged.
  `lam_y` is the label weight of the example itself: f32[B] (per_example) or
  f32[] (one draw for the batch; the mask is then the same for every example).

  Each draw (per example or per batch):
  1. with probability `1 - apply_prob` nothing is mixed (mask 1, `lam_y` 1);
  2. else, if `mixup_alpha > 0`, CutMix with probability `switch_prob` and
     mixup with `lam ~ Beta(mixup_alpha, mixup_alpha)` otherwise (a constant
     mask `lam`, `lam_y = lam`); with `mixup_alpha = 0` always CutMix;
  3. CutMix: `lam ~ Beta(alpha, alpha)`, box of side `int(H * sqrt(1 - lam))`
     by `int(W * sqrt(1 - lam))` centred at a uniform pixel `(cy, cx)` and
     clipped to the image (timm's `rand_bbox`); with `minmax=(lo, hi)` the box
     sides are instead uniform integers in `[int(H lo), int(H hi))` (and W),
     placed wholly inside the image (timm's `rand_bbox_minmax`).
     `lam_y` is `1 - box area / (H W)` (the kept area) when `correct_lam`
     or `minmax` is set, else the drawn `lam`.

  alpha, mixup_alpha, switch_prob, apply_prob: floats or f32[] (pytree
  leaves). image_shape: static (H, W). per_example, correct_lam: static bools.
  minmax: None or a static (lo, hi) with 0 < lo < hi <= 1.

  Methods: `amp` is not defined on a CutMix draw (its lambda-gradient needs a
  scalar input coefficient, a hard box has none) and `methods.get_objective`
  refuses both AMP and MixupE on it; MixupE's first-order weight is not defined either
  (`first_order_weight` raises). Hidden-layer mixing points are refused too:
  the mask has the image's shape.
  """
  alpha: Scalar
  image_shape: tuple[int, int]
  per_example: bool = True
  correct_lam: bool = True
  minmax: Optional[tuple[float, float]] = None
  mixup_alpha: Scalar = 0.0
  switch_prob: Scalar = 0.5
  apply_prob: Scalar = 1.0

  def __post_init__(self):
    shape = tuple(self.image_shape) if isinstance(self.image_shape, (tuple, list)) else ()
    if len(shape) != 2 or not all(isinstance(n, (int, np.integer)) and n > 0 for n in shape):
      raise ValueError(f"CutMix image_shape must be (H, W), two positive ints (the image's "
                       f"height and width, without channels), got {self.image_shape!r}.")
    object.__setattr__(self, "image_shape", tuple(int(n) for n in shape))
    if self.minmax is not None:
      mm = tuple(float(v) for v in self.minmax)
      h, w = self.image_shape
      if (len(mm) != 2 or not 0.0 < mm[0] < mm[1] <= 1.0
          or int(h * mm[0]) >= int(h * mm[1]) or int(w * mm[0]) >= int(w * mm[1])):
        raise ValueError(f"CutMix minmax must be (lo, hi) with 0 < lo < hi <= 1 and at least "
                         f"one integer box side in [int(H lo), int(H hi)) for image_shape "
                         f"{self.image_shape}, got {self.minmax!r}; use None for boxes from lam.")
      object.__setattr__(self, "minmax", mm)
    alpha, _ = sampling.resolve_beta(self.alpha, None)
    object.__setattr__(self, "alpha", alpha)
    if not checks.is_traced(self.mixup_alpha) and float(self.mixup_alpha) < 0:
      raise ValueError(f"CutMix mixup_alpha must be >= 0 (0: CutMix only), got "
                       f"{self.mixup_alpha!r}.")
    _check_prob("CutMix switch_prob", self.switch_prob)
    _check_prob("CutMix apply_prob", self.apply_prob)
    object.__setattr__(self, "per_example", bool(self.per_example))
    object.__setattr__(self, "correct_lam", bool(self.correct_lam))

  @property
  def beta(self) -> Scalar:
    return self.alpha

  def __call__(self, key: jax.Array, batch_size: int) -> Coefficients:
    n = int(batch_size) if self.per_example else 1
    h, w = self.image_shape
    k_apply, k_switch, k_mix, k_lam, k_h, k_w, k_y, k_x = jax.random.split(key, 8)
    lam = sampling.sample_beta(k_lam, self.alpha, self.alpha, (n,))
    if self.minmax is None:
      ratio = jnp.sqrt(1.0 - lam)
      cut_h = jnp.floor(h * ratio).astype(jnp.int32)
      cut_w = jnp.floor(w * ratio).astype(jnp.int32)
      cy = jax.random.randint(k_y, (n,), 0, h)
      cx = jax.random.randint(k_x, (n,), 0, w)
      y0, y1 = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h // 2, 0, h)
      x0, x1 = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w // 2, 0, w)
    else:
      lo, hi = self.minmax
      cut_h = jax.random.randint(k_h, (n,), int(h * lo), int(h * hi))
      cut_w = jax.random.randint(k_w, (n,), int(w * lo), int(w * hi))
      y0 = jax.random.randint(k_y, (n,), 0, h - cut_h)
      x0 = jax.random.randint(k_x, (n,), 0, w - cut_w)
      y1, x1 = y0 + cut_h, x0 + cut_w
    rows, cols = jnp.arange(h), jnp.arange(w)
    in_rows = (rows >= y0[:, None]) & (rows < y1[:, None])  # [n, H]
    in_cols = (cols >= x0[:, None]) & (cols < x1[:, None])  # [n, W]
    box = in_rows[:, :, None] & in_cols[:, None, :]  # [n, H, W]
    kept = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / float(h * w)
    lam_cut = kept if (self.correct_lam or self.minmax is not None) else lam

    mixup_alpha = jnp.asarray(self.mixup_alpha, jnp.float32)
    lam_mix = sampling.sample_beta(k_mix, jnp.where(mixup_alpha > 0, mixup_alpha, 1.0),
                                   jnp.where(mixup_alpha > 0, mixup_alpha, 1.0), (n,))
    use_cut = (mixup_alpha <= 0) | (jax.random.uniform(k_switch, (n,)) < self.switch_prob)
    applied = jax.random.uniform(k_apply, (n,)) < self.apply_prob
    mask = jnp.where(use_cut[:, None, None], 1.0 - box.astype(jnp.float32),
                     lam_mix[:, None, None])
    mask = jnp.where(applied[:, None, None], mask, 1.0)[..., None].astype(jnp.float32)
    lam_y = jnp.where(applied, jnp.where(use_cut, lam_cut, lam_mix), 1.0).astype(jnp.float32)
    if not self.per_example:
      return Coefficients(jnp.broadcast_to(mask, (int(batch_size), h, w, 1)), lam_y[0])
    return Coefficients(mask, lam_y)

  def first_order_weight(self) -> float:
    """Not defined for CutMix: ValueError saying what to pass instead."""
    raise ValueError("CutMix has no first-order weight: MixupE's term expands the loss along "
                     "x_j - x_i with a scalar coefficient, and a CutMix box is not a scalar "
                     "coefficient. Use MixupE with a mixup-family policy, or pass it an "
                     "explicit weight=<value> at your own risk.")


def cutmix(alpha: Scalar, image_shape: tuple[int, int], per_example: bool = True,
           correct_lam: bool = True, minmax: Optional[tuple[float, float]] = None,
           mixup_alpha: Scalar = 0.0, switch_prob: Scalar = 0.5,
           apply_prob: Scalar = 1.0) -> CutMix:
  """CutMix, optionally switched with mixup (timm's `Mixup`): see `CutMix`."""
  return CutMix(alpha, image_shape, per_example, correct_lam, minmax, mixup_alpha, switch_prob,
                apply_prob)


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


_FACTORIES = {"erm": "erm()", "mixup": "mixup(alpha)", "untied_mixup": "untied_mixup(alpha, beta)",
              "dat": "dat(alpha)", "weighted": "weighted(policy, gamma)",
              "cutmix": "cutmix(alpha, image_shape)"}


def check_policy(name: str, policy: Any) -> None:
  """ValueError unless `policy` is a policy (not a factory such as `policies.mixup` itself)."""
  factory = getattr(policy, "__name__", None)
  if factory in _FACTORIES and getattr(policy, "__module__", None) == __name__:
    raise ValueError(f"{name} got the factory policies.{factory}; pass a policy built from it, "
                     f"e.g. policies.{_FACTORIES[factory]}.")
  if not callable(policy):
    raise ValueError(f"{name} must be a mixing policy `policy(key, batch_size) -> Coefficients` "
                     f"such as policies.mixup(1.0), got {policy!r}.")


def get_policy(name: str, **kwargs) -> Policy:
  """Builds a policy by name: one of 'erm', 'mixup', 'untied', 'dat'.

  CutMix needs the image shape: build it with `cutmix(...)`, or through
  `methods.get_objective('mixup', cutmix_alpha=..., image_shape=(H, W))`.
  """
  if name not in _REGISTRY:
    raise ValueError(f"Unknown policy {name!r}; choose one of {sorted(_REGISTRY)}.")
  return _REGISTRY[name](**kwargs)


PolicyLike = Union[str, Policy]
