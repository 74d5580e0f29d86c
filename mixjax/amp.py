"""AMP, the adversarial mixing policy (Liu et al. 2021), as an objective wrapper.

`amp(base)` wraps any mixup-family objective (`objectives.Mixup`: mixup,
Untied MixUp, DAT, at the input or at a hidden layer) the way an optax
transformation wraps another. One step, with per-example coefficients `lam`:

1. Rand: draw `lam` and partners as `base` does (label coefficient `lam_y`).
2. Max: `g = d/d lam_x sum_i L_i(lam_x)` at `lam_x = lam` (`jax.grad` with
   respect to the vector of input coefficients; the label coefficients stay
   `lam_y`), clipped to `[-1, 1]`; `lam' = clip(lam + eps * g, 0, 1)`.
3. Min: `m_i = [L_i(lam') > L_i(lam)]`, `L_final = (1 - m) L(lam) + m L(lam')`.

`L_i(lam_x)` is the interpolated per-example loss
`lam_y l(f(h~), y_i) + (1 - lam_y) l(f(h~), y_j)`, `h~ = lam_x h_i + (1 - lam_x) h_j`.

Passes. The lambda-gradient pass (forward and a backward to `lam` only) and
the comparison pass (forward at `lam'`) run on `stop_gradient` parameters,
with the same dropout key as the final pass (so the same dropout masks), and
their batch-norm updates are discarded. The final pass runs once, at the
selected `lam_final = where(m, lam', lam)`, and is the only one the parameter
gradient and the new batch statistics come from: the gradient is that of
`mean(L_final)` with `m` and `lam'` constants. Per example this equals
`(1 - m) L(lam) + m L(lam')` exactly when examples do not interact; with batch
norm in training mode the final pass normalises with the statistics of the
selected batch (which differ from those of the `lam` and `lam'` batches by
O(eps / B)).

Mixing at a hidden layer. With `objectives.make_apply` (linen interception),
every pass runs the whole model: the layers below the mixing point run three
times in the program (forward only in the two extra passes; XLA may merge the
identical computations, see benchmarks/methods_overhead.py). For a model
split into `encode(x) -> h` and `head(h) -> outputs` (a `SplitApply`, e.g.
from `make_split_apply`) and `base.point == apply.point`, the encoder runs
once and only the head is re-run by the lambda passes ("Sent" mixing at the
last hidden state in the AMP paper).

Modes (the paper's ablation rows): 'rand' (= the base, mixup), 'max' (always
`lam'`, no comparison pass), 'full' (AMP). Where `lam' == lam` (eps = 0, or
`lam` at a bound pushed outwards) the mask is 0: `L'` is `L` there and any
difference is rounding, so eps = 0 reproduces the base exactly in every mode.
A per-batch `lam` from the policy is broadcast to one per example.

Metrics (f32[]): 'loss', 'lam_mean', 'amp_grad_abs' (mean |g| before
clipping), 'amp_dlam' (mean lam' - lam), 'amp_mask_frac' (mean m),
'amp_loss' (mean L(lam)) and, for 'full', 'amp_loss_adv' (mean L(lam')).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixjax import checks
from mixjax import losses as losses_lib
from mixjax import mixing
from mixjax import objectives

PyTree = Any
Metrics = dict[str, jax.Array]
MODES = ("rand", "max", "full")


# ----------------------------------------------------------------------------
# Models split at the mixing point.


@dataclasses.dataclass(frozen=True)
class SplitApply:
  """An `ApplyFn` made of an encoder and a head, mixing allowed at their junction.

  encode: `encode(variables, inputs, *, key) -> (h, new_model_state)`, h a pytree
    with leading batch axis B.
  head: `head(variables, h, *, key) -> (outputs, new_model_state)`.
  point: the name of the mixing point between them (use it as the mixup
    objective's `point`).

  Called as any `ApplyFn`: `apply(variables, inputs, *, key, mix)` with `mix`
  None, at the input (`mix.point is None`) or at `point`. Both parts get the
  same dropout `key` (linen derives distinct streams per submodule path, so a
  linen model split by methods draws the same masks as when called whole).
  The head sees the variables updated by the encoder's new state; the new
  state is the union of both.
  """
  encode: Callable[..., tuple[PyTree, PyTree]]
  head: Callable[..., tuple[Any, PyTree]]
  point: str = "encoder"

  def run_encoder(self, variables: PyTree, inputs: PyTree, key: Optional[jax.Array]
                  ) -> tuple[PyTree, PyTree, PyTree]:
    """(h, variables for the head, encoder's new state)."""
    h, state = self.encode(variables, inputs, key=key)
    return h, {**variables, **state}, dict(state)

  def __call__(self, variables: PyTree, inputs: PyTree, *, key: Optional[jax.Array] = None,
               mix: Optional[objectives.MixSpec] = None):
    if mix is not None and mix.point not in (None, self.point):
      raise ValueError(f"This SplitApply mixes at its inputs (point=None) or at {self.point!r}; "
                       f"got point={mix.point!r}.")
    if mix is not None and mix.point is None:
      inputs = mixing.mix_with_partner(inputs, mix.perm, mix.lam, mesh=mix.mesh,
                                       axis_name=mix.axis_name)
    h, head_vars, enc_state = self.run_encoder(variables, inputs, key)
    if mix is not None and mix.point == self.point:
      h = mixing.mix_with_partner(h, mix.perm, mix.lam, mesh=mix.mesh, axis_name=mix.axis_name)
    out, head_state = self.head(head_vars, h, key=key)
    return out, {**enc_state, **dict(head_state)}


def make_split_apply(module: nn.Module, encode: str = "encode", head: str = "head",
                     point: str = "encoder", train: bool = True,
                     mutable: tuple[str, ...] = ("batch_stats",),
                     train_arg: Optional[str] = "train") -> SplitApply:
  """A `SplitApply` from a linen module with methods `encode(x, train)` and `head(h, train)`.

  The module's `__call__` should be `head(encode(x))`. `train`, `mutable`,
  `train_arg` as in `objectives.make_apply`.
  """
  for name in (encode, head):
    if not callable(getattr(module, name, None)):
      raise ValueError(f"{type(module).__name__} has no method {name!r}; make_split_apply needs "
                       f"encode={encode!r} and head={head!r} methods.")

  def part(method):
    def run(variables, x, *, key=None):
      rngs = {"dropout": key} if key is not None else {}
      kwargs = {train_arg: train} if train_arg else {}
      cols = [c for c in mutable if c in variables] if train else []
      if cols:
        out, state = module.apply(variables, x, rngs=rngs, mutable=cols, method=method, **kwargs)
        return out, dict(state)
      return module.apply(variables, x, rngs=rngs, method=method, **kwargs), {}
    return run

  return SplitApply(part(encode), part(head), point)


def split_apply_fn(encode: Callable[[PyTree, PyTree], PyTree],
                   head: Callable[[PyTree, PyTree], jax.Array],
                   point: str = "encoder") -> SplitApply:
  """A `SplitApply` from plain `encode(params, x) -> h` and `head(params, h) -> outputs`."""
  return SplitApply(lambda v, x, *, key=None: (encode(v["params"], x), {}),
                    lambda v, h, *, key=None: (head(v["params"], h), {}), point)


# ----------------------------------------------------------------------------
# AMP.


class Encoded(NamedTuple):
  """The encoder's output on the split fast path: h (live), head variables, encoder state."""
  h: PyTree
  head_variables: PyTree
  state: PyTree


class Prepared(NamedTuple):
  """Everything before the final pass of a mixup-family step.

  draw: the `objectives.Draw`, its `spec.lam` the input coefficient of the
    final pass (AMP: `lam_final`, f32[B]).
  key: dropout key of the final pass.
  encoded: `Encoded` on the split fast path (the final pass runs the head only), else None.
  metrics: f32[] scalars.
  """
  draw: objectives.Draw
  key: jax.Array
  encoded: Optional[Encoded]
  metrics: Metrics


def _per_example_lam(lam: jax.Array, batch: int) -> jax.Array:
  return jnp.broadcast_to(jnp.asarray(lam, jnp.float32), (batch,))


def head_losses(base: objectives.Mixup, apply: SplitApply, encoded: Encoded, draw: objectives.Draw,
                key: Optional[jax.Array], lam_x: jax.Array, stop: bool = False):
  """Per-example losses from the head only, mixing `encoded.h` with `lam_x`.

  stop: `stop_gradient` on h and the variables (the lambda passes).
  Returns (per-example f32[B], outputs, new state (encoder's and head's)).
  """
  h, v = encoded.h, encoded.head_variables
  if stop:
    h, v = jax.lax.stop_gradient((h, v))
  spec = draw.spec
  hm = mixing.mix_with_partner(h, spec.perm, lam_x, mesh=spec.mesh, axis_name=spec.axis_name)
  out, head_state = apply.head(v, hm, key=key)
  per_example = losses_lib.mixup_loss(base.loss_fn, out, draw.targets_a, draw.targets_b,
                                      draw.coeffs.lam_y, base.interpolate)
  return per_example, out, {**encoded.state, **dict(head_state)}


def final_losses(base: objectives.Mixup, apply: objectives.ApplyFn, variables: PyTree,
                 inputs: PyTree, prepared: Prepared):
  """The final pass: (per-example losses f32[B], outputs, new model state)."""
  if prepared.encoded is not None:
    return head_losses(base, apply, prepared.encoded, prepared.draw, prepared.key,
                       prepared.draw.spec.lam)
  return base.losses(apply, variables, inputs, prepared.draw, prepared.key)


@dataclasses.dataclass(frozen=True)
class Amp:
  """AMP around a mixup-family objective (see the module docstring).

  base: an `objectives.Mixup` (any policy, input or hidden mixing point).
  eps: step size of the Max step (>= 0; the paper's 0.002).
  mode: 'rand', 'max' or 'full'.
  clip: the Max step's gradient is clipped to [-clip, clip] (the paper: 1).
  """
  base: objectives.Mixup
  eps: float = 0.002
  mode: str = "full"
  clip: float = 1.0

  def __post_init__(self):
    if not isinstance(self.base, objectives.Mixup):
      raise ValueError(f"amp wraps a mixup-family objective (objectives.Mixup: mixup, untied, "
                       f"dat), got {type(self.base).__name__}.")
    if self.mode not in MODES:
      raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}.")
    try:
      eps = float(self.eps)
    except (TypeError, ValueError):
      raise ValueError(f"eps must be a number >= 0, got {self.eps!r}.") from None
    if not math.isfinite(eps) or eps < 0:
      raise ValueError(f"eps must be a finite number >= 0, got {self.eps!r}.")
    checks.positive_number("clip", self.clip)

  @property
  def to_logits(self) -> Callable[[jax.Array], jax.Array]:
    return self.base.to_logits

  def init(self, sample_inputs: PyTree) -> dict[str, PyTree]:
    """The base's extra model-state collections."""
    return self.base.init(sample_inputs)

  def fast_path(self, apply: objectives.ApplyFn) -> bool:
    """Whether the encoder runs once (split model mixed at its split point)."""
    return (isinstance(apply, SplitApply) and self.base.point is not None
            and self.base.point == apply.point)

  def lambda_loss(self, apply: objectives.ApplyFn, variables: PyTree, inputs: PyTree,
                  draw: objectives.Draw, key: Optional[jax.Array]
                  ) -> tuple[Callable[[jax.Array], jax.Array], Optional[Encoded]]:
    """`(lam_x f32[B] -> per-example losses f32[B], encoded)` for the lambda passes.

    Runs on `stop_gradient` parameters with dropout key `key`; the batch-norm
    updates of these passes are dropped. On the split fast path the encoder
    runs here, once, with live parameters (`encoded`, reused by the final pass).
    """
    if self.fast_path(apply):
      encoded = Encoded(*apply.run_encoder(variables, inputs, key))
      return (lambda l: head_losses(self.base, apply, encoded, draw, key, l, stop=True)[0],
              encoded)
    frozen = jax.lax.stop_gradient(variables)
    return lambda l: self.base.losses(apply, frozen, inputs, draw, key, lam_x=l)[0], None

  def prepare(self, apply: objectives.ApplyFn, variables: PyTree, inputs: PyTree,
              labels: jax.Array, key: jax.Array) -> Prepared:
    """Rand and Max (and, for 'full', the comparison): the draw for the final pass."""
    k_mix, k_drop = jax.random.split(key)  # As objectives.Mixup, so 'rand' equals it.
    draw = self.base.draw(k_mix, inputs, labels)
    if self.mode == "rand":
      return Prepared(draw, k_drop, None, {"lam_mean": jnp.mean(draw.coeffs.lam_x)})
    batch = checks.batch_size("inputs", inputs)
    lam = _per_example_lam(draw.spec.lam, batch)
    draw = draw._replace(spec=draw.spec._replace(lam=lam))

    loss_fn, encoded = self.lambda_loss(apply, variables, inputs, draw, k_drop)
    grad, loss = lam_grad(loss_fn, lam)
    lam_adv = jnp.clip(lam + self.eps * jnp.clip(grad, -self.clip, self.clip), 0.0, 1.0)
    metrics = {"lam_mean": jnp.mean(lam), "amp_grad_abs": jnp.mean(jnp.abs(grad)),
               "amp_dlam": jnp.mean(lam_adv - lam), "amp_loss": jnp.mean(loss)}
    if self.mode == "max":
      lam_final = lam_adv
      metrics["amp_mask_frac"] = jnp.ones((), jnp.float32)
    else:
      loss_adv = loss_fn(lam_adv)
      # Where lam' == lam, L' is L: a difference is rounding (the two are computed
      # by different programs), so the mask stays 0 and eps = 0 is exactly mixup.
      mask = (loss_adv > loss) & (lam_adv != lam)
      lam_final = jnp.where(mask, lam_adv, lam)
      metrics["amp_mask_frac"] = jnp.mean(mask.astype(jnp.float32))
      metrics["amp_loss_adv"] = jnp.mean(loss_adv)
    lam_final = jax.lax.stop_gradient(lam_final)
    metrics = jax.lax.stop_gradient(metrics)
    return Prepared(draw._replace(spec=draw.spec._replace(lam=lam_final)), k_drop, encoded,
                    metrics)

  def __call__(self, apply, variables, inputs, labels, key):
    prepared = self.prepare(apply, variables, inputs, labels, key)
    per_example, _, state = final_losses(self.base, apply, variables, inputs, prepared)
    loss = jnp.mean(per_example)
    return loss, (state, {"loss": loss, **prepared.metrics})


def lam_grad(loss_fn: Callable[[jax.Array], jax.Array], lam: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
  """`(d/d lam sum_i loss_fn(lam)_i, loss_fn(lam))`, both f32[B]: the Max step's gradient."""
  def summed(l):
    values = loss_fn(l)
    return jnp.sum(values), values
  return jax.grad(summed, has_aux=True)(lam)


def amp(objective: objectives.Mixup, eps: float = 0.002, mode: str = "full",
        clip: float = 1.0) -> Amp:
  """AMP around a mixup-family objective (see `Amp`)."""
  return Amp(objective, eps, mode, clip)


def prepare(objective: Any, apply: objectives.ApplyFn, variables: PyTree, inputs: PyTree,
            labels: jax.Array, key: jax.Array) -> Prepared:
  """`Prepared` for a `Mixup` (just the draw) or an `Amp` (draw at `lam_final`)."""
  if isinstance(objective, Amp):
    return objective.prepare(apply, variables, inputs, labels, key)
  if isinstance(objective, objectives.Mixup):
    k_mix, k_drop = jax.random.split(key)
    draw = objective.draw(k_mix, inputs, labels)
    return Prepared(draw, k_drop, None, {"lam_mean": jnp.mean(draw.coeffs.lam_x)})
  raise ValueError(f"expected a mixup-family objective (objectives.Mixup or amp.Amp), got "
                   f"{type(objective).__name__}.")


def mixup_base(objective: Any) -> objectives.Mixup:
  """The `Mixup` inside an `Amp` (or the `Mixup` itself)."""
  return objective.base if isinstance(objective, Amp) else objective
