"""AMP, the adversarial mixing policy (Liu et al. 2021), as an objective wrapper.

`amp(base)` wraps any objective whose draw mixes (`base.mixes`: mixup,
Untied MixUp, DAT, at the input or at a hidden layer, and any `Wrapper` of
them) and whose loss is a mean of per-example losses (`base.decomposes`),
the way an optax transformation wraps another. Nesting: `mixupe(amp(m))`
adds MixupE's term to AMP's loss; `amp(mixupe(m))` is refused (MixupE's loss
is not a per-example mean, so there is no per-example L(lam) to compare);
`amp(amp(m))` is refused too. One step, with per-example coefficients `lam`:

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

Mixing at a hidden layer. The layers below the mixing point run once and
only the layers above it are re-run by the lambda passes ("Sent" mixing at
the last hidden state in the AMP paper), for a model split into
`encode(x) -> h` and `head(h) -> outputs` (an `adapters.SplitApply`, e.g.
from `adapters.make_split_apply`, with `base.point == apply.point`) and for
an unmodified linen or NNX model (`adapters.make_apply`,
`adapters.make_nnx_apply`): there one pass records the point's output `h` and
what the layers below it computed (`hidden.capture_below`,
`hidden.nnx_capture_below`), and every later pass starts at the point
(`hidden.inject_at`, `hidden.nnx_inject_at`). Their batch-norm updates are
those of the final pass (the layers below the point from the recording pass,
which computes the same statistics). MixupE's concatenated pass over AMP
starts at the point too (`mixupe.MixupE`). A point whose submodule is called
more than once and other `ApplyFn`s run the whole model in every pass.

Modes (the paper's ablation rows): 'rand' (= the base, mixup), 'max' (always
`lam'`, no comparison pass), 'full' (AMP). Where `lam' == lam` (eps = 0, or
`lam` at a bound pushed outwards) the mask is 0: `L'` is `L` there and any
difference is rounding, so eps = 0 reproduces the base exactly in every mode.
A per-batch `lam` from the policy is broadcast to one per example.

Variants. variant='paper' (the default) is the rule above, as the paper's
text states it (Sec. 3.3-3.4, Eqs. 15-21). variant='released' is the rule of
the authors' released code (github.com/PAI-SmallIsAllYourNeed/Mixup-AMP,
`run_main.py` with `--adv_flag`, `model.py`'s `mixup_process`), for matching
their published numbers; where the two differ the paper's is the default. The
released rule, per example:

1. Max: the gradient is that of the batch-mean loss, `g / B`, and is not
   clipped: `lam' = clip(lam + eps * g / B, 0, 1)`. The code does not clip
   `lam'` either; mixjax keeps every mixing coefficient in [0, 1] (its mixing
   refuses others), which changes `lam'` only within `eps * |g| / B` of a
   bound (4e-5 |g| at the code's eps = 0.002, batch 50). The gradient moves
   only the input coefficient (the code detaches the label coefficient), but
   the comparison and the selected loss mix the labels with the moved
   coefficient too: `lam_y' = clip(lam_y + (lam' - lam), 0, 1)` (the code's
   mixup is tied, `lam_y = lam`, so `lam_y' = lam'`; the paper keeps the
   label's `lam`).
2. Min: `delta_i = L_i(lam') - L_i(lam)`, `m_i = [delta_i > 0]`, and each
   example's selected loss is re-weighted by
   `w_i = 1 + (delta_i - mu) / sigma` where `delta_i > mu`, else 1, with `mu`
   and `sigma` (the unbiased standard deviation) over the positive `delta`s
   of the last `window` steps, this one included (`--moving_avg`, default 5).
   `w` is a constant (no gradient); the loss is `mean(w * L_final)`.
   The window is model state: `init(sample_inputs)` returns
   `{'amp': {'window': f32[window, 3]}}`, one row per step (count, mean and
   sum of squared deviations of that step's positive `delta`s; zeros before
   the first steps), and the new window is returned in the new model state
   (also through `mixupe(amp(...))`).
3. Fewer than two positive `delta`s in the window, or all of them equal
   (`sigma = 0`): the released code computes `(delta - mu) / sigma * mask`
   with a NaN or zero `sigma` (and a NaN `mu` for an empty window), so its
   weights and its loss are NaN, even where the mask is 0. Here every `w_i`
   is 1 for that step (AMP's selection without re-weighting) and the step's
   positives still enter the window. This is the code's rule read as a
   selection: in those cases no example has `delta_i > mu` (this step's
   positives are in the window), so the only weights it changes are the
   masked-out ones it turns into NaN.

Where `lam' == lam` the comparison is skipped as in the paper variant
(`delta = 0`). Mode 'max' with the released variant takes the released Max
step (always `lam'`, labels moved) with no comparison, weights or window (the
released code has no such mode); 'rand' is the base in both variants.
Further differences of the released code that this variant does not copy,
because they belong to the base objective or the training loop: its loss is
`BCE(softmax(f), mixed labels)` summed over classes (pass
`loss_fn=` to the base to match), each of its passes draws fresh dropout
masks (here all passes share the final pass's key), the parameter gradient
flows through the `lam` and `lam'` passes themselves (here one final pass at
the selected coefficients, the same per example without batch norm), and it
clips the parameter gradient's norm at 10 (an optimizer setting).

Metrics (f32[]): 'loss', 'lam_mean', 'amp_grad_abs' (mean |g| before
clipping), 'amp_dlam' (mean lam' - lam), 'amp_mask_frac' (mean m),
'amp_loss' (mean L(lam)) and, for 'full', 'amp_loss_adv' (mean L(lam')); with
variant='released' and 'full' also 'amp_weight_max' (max w) and
'amp_window_count' (positive deltas in the window).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from mixjax import adapters
from mixjax import checks
from mixjax import objectives
from mixjax import policies

PyTree = Any
MODES = ("rand", "max", "full")
VARIANTS = ("paper", "released")
STATE_COLLECTION = "amp"
RELEASED_WINDOW = 5  # run_main.py's --moving_avg default.


class ReweightedDraw(NamedTuple):
  """A `mixing.Draw` with the released variant's per-example weights and new window.

  coeffs, perm, targets_a, targets_b: as in `mixing.Draw` (here `coeffs` are
    f32[B] each, the final pass's).
  weights: f32[B] loss weights (no gradient), applied by `Amp.per_example`.
  state: the model-state collections this step updated,
    `{'amp': {'window': f32[window, 3]}}`; `Amp.forward` (and `MixupE`, which
    runs its own final pass) returns them in the new model state.
  """
  coeffs: Optional[policies.Coefficients]
  perm: Optional[jax.Array]
  targets_a: jax.Array
  targets_b: Optional[jax.Array]
  weights: jax.Array
  state: dict[str, PyTree]


@dataclasses.dataclass(frozen=True)
class Amp(objectives.Wrapper):
  """AMP around a mixing objective (see the module docstring).

  base: an objective with `base.mixes` and `base.decomposes` (e.g.
    `objectives.Mixup`: any policy, input or hidden mixing point).
  eps: step size of the Max step (>= 0; the paper's 0.002).
  mode: 'rand', 'max' or 'full'.
  clip: the Max step's gradient is clipped to [-clip, clip] (the paper: 1;
    variant='paper' only, the released code does not clip).
  variant: 'paper' (the paper's rule, default) or 'released' (the authors'
    code: a step of eps / B, no gradient clipping, labels moved with lam',
    re-weighting over a moving window; see the module docstring).
  window: steps in the released variant's moving window (the code's 5).
  """
  eps: float = 0.002
  mode: str = "full"
  clip: float = 1.0
  variant: str = "paper"
  window: int = RELEASED_WINDOW

  def __post_init__(self):
    super().__post_init__()
    if not getattr(self.base, "mixes", False):
      raise ValueError(f"amp perturbs the mixing coefficient, so it wraps an objective that "
                       f"mixes (mixup, untied, dat); {type(self.base).__name__} does not mix.")
    if not getattr(self.base, "decomposes", False):
      raise ValueError(f"amp compares per-example losses, so its base's loss must be a mean of "
                       f"per-example losses; {type(self.base).__name__}'s is not. Put amp "
                       f"inside: mixupe(amp(base)), not amp(mixupe(base)).")
    if isinstance(getattr(self.base, "policy", None), policies.CutMix):
      raise ValueError("amp is not defined on a CutMix policy: AMP's Max step differentiates the "
                       "loss with respect to a scalar input coefficient lam, and a CutMix box is a "
                       "hard 0/1 mask with no gradient in lam. Use a mixup-family policy "
                       "(policies.mixup/untied_mixup/dat) under amp.")
    if any(isinstance(o, Amp) for o in _chain(self.base)):
      raise ValueError("amp(amp(...)): AMP is applied once; set eps and mode on one amp.")
    if self.mode not in MODES:
      raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}.")
    try:
      eps = float(self.eps)
    except (TypeError, ValueError):
      raise ValueError(f"eps must be a number >= 0, got {self.eps!r}.") from None
    if not math.isfinite(eps) or eps < 0:
      raise ValueError(f"eps must be a finite number >= 0, got {self.eps!r}.")
    checks.positive_number("clip", self.clip)
    if self.variant not in VARIANTS:
      raise ValueError(f"variant must be one of {list(VARIANTS)} ('paper': the AMP paper's rule, "
                       f"'released': the authors' released code), got {self.variant!r}.")
    if self.variant == "released" and self.clip != 1.0:
      raise ValueError(f"clip applies to variant='paper' only (the released code does not clip "
                       f"the lambda gradient), got clip={self.clip!r} with variant='released'.")
    if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
      raise ValueError(f"window must be a positive integer (steps in the released variant's "
                       f"moving window), got {self.window!r}.")

  @property
  def keeps_window(self) -> bool:
    """Whether this objective keeps the released variant's window in the model state."""
    return self.variant == "released" and self.mode == "full"

  def init(self, sample_inputs: PyTree) -> dict[str, PyTree]:
    """The base's collections, plus `{'amp': {'window': zeros f32[window, 3]}}` when kept."""
    state = dict(self.base.init(sample_inputs))
    if self.keeps_window:
      state[STATE_COLLECTION] = {"window": jnp.zeros((self.window, 3), jnp.float32)}
    return state

  def fast_path(self, apply: adapters.ApplyFn) -> bool:
    """Whether the layers below the mixing point run once.

    They do for a `SplitApply` mixed at its split point and for a linen or
    NNX model (`adapters.make_apply`, `adapters.make_nnx_apply`) mixed at any
    hidden point.
    """
    encodes_at = getattr(apply, "encodes_at", None)
    return encodes_at is not None and encodes_at(self.point)

  def lambda_loss(self, apply: adapters.ApplyFn, variables: PyTree, inputs: PyTree,
                  prepared: objectives.Prepared) -> Callable[[jax.Array], jax.Array]:
    """`lam_x f32[B] -> per-example losses f32[B]` for the lambda passes.

    Runs on `stop_gradient` parameters (and encoder output) with the final
    pass's dropout key; the batch-norm updates of these passes are dropped.
    """
    frozen = jax.lax.stop_gradient(variables)
    if prepared.encoded is not None:
      prepared = prepared._replace(encoded=jax.lax.stop_gradient(prepared.encoded))
    return lambda l: self.base.losses(apply, frozen, inputs,
                                      objectives.with_lam_x(prepared, l))[0]

  def prepare(self, apply, variables, inputs, labels, key) -> objectives.Prepared:
    """Rand (the base's draw), Max and, for 'full', the comparison: the final pass's draw."""
    if self.variant == "released":
      return self._prepare_released(apply, variables, inputs, labels, key)
    prepared = self.base.prepare(apply, variables, inputs, labels, key)
    if self.mode == "rand":
      return prepared
    batch = checks.batch_size("inputs", inputs)
    lam = jnp.broadcast_to(jnp.asarray(prepared.draw.coeffs.lam_x, jnp.float32), (batch,))
    prepared = objectives.with_lam_x(prepared, lam)
    if self.fast_path(apply) and prepared.encoded is None:
      prepared = prepared._replace(encoded=apply.run_encoder(variables, inputs, prepared.key,
                                                             self.point))

    loss_fn = self.lambda_loss(apply, variables, inputs, prepared)
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
    prepared = objectives.with_lam_x(prepared, jax.lax.stop_gradient(lam_final))
    metrics = jax.lax.stop_gradient(metrics)
    return prepared._replace(metrics={**prepared.metrics, **metrics})

  def _prepare_released(self, apply, variables, inputs, labels, key) -> objectives.Prepared:
    """The released code's Max and Min steps (module docstring, "Variants")."""
    variables = dict(variables)
    state = variables.pop(STATE_COLLECTION, None)
    prepared = self.base.prepare(apply, variables, inputs, labels, key)
    if self.mode == "rand":
      return prepared
    batch = checks.batch_size("inputs", inputs)
    coeffs = prepared.draw.coeffs
    lam = jnp.broadcast_to(jnp.asarray(coeffs.lam_x, jnp.float32), (batch,))
    lam_y = jnp.broadcast_to(jnp.asarray(coeffs.lam_y, jnp.float32), (batch,))
    prepared = _with_coeffs(prepared, lam, lam_y)
    if self.fast_path(apply) and prepared.encoded is None:
      prepared = prepared._replace(encoded=apply.run_encoder(variables, inputs, prepared.key,
                                                             self.point))

    loss_fn = self.lambda_loss(apply, variables, inputs, prepared)
    grad, loss = lam_grad(loss_fn, lam)
    # The gradient of the batch mean, unclipped; lam' kept in [0, 1] (module docstring).
    lam_adv = jnp.clip(lam + (self.eps / batch) * grad, 0.0, 1.0)
    lam_y_adv = jnp.clip(lam_y + (lam_adv - lam), 0.0, 1.0)  # The labels move with the input.
    metrics = {"lam_mean": jnp.mean(lam), "amp_grad_abs": jnp.mean(jnp.abs(grad)),
               "amp_dlam": jnp.mean(lam_adv - lam), "amp_loss": jnp.mean(loss)}
    weights = jnp.ones((batch,), jnp.float32)
    new_state = {}
    if self.mode == "max":
      lam_final, lam_y_final = lam_adv, lam_y_adv
      metrics["amp_mask_frac"] = jnp.ones((), jnp.float32)
    else:
      if state is None:
        raise ValueError("amp(variant='released', mode='full') keeps a moving window of loss "
                         "increases in the model state: merge objective.init(sample_inputs) "
                         "into the variables.")
      frozen = self.lambda_loss(apply, variables, inputs, _with_coeffs(prepared, lam, lam_y_adv))
      loss_adv = frozen(lam_adv)
      # Where lam' == lam, L' is L (the difference is rounding): delta is 0.
      delta = jnp.where(lam_adv != lam, loss_adv - loss, 0.0)
      mask = delta > 0
      window = push_window(state["window"], window_row(delta))
      count, mu, sigma = window_moments(window)
      weights = released_weights(delta, count, mu, sigma)
      lam_final = jnp.where(mask, lam_adv, lam)
      lam_y_final = jnp.where(mask, lam_y_adv, lam_y)
      new_state = {STATE_COLLECTION: {**state, "window": jax.lax.stop_gradient(window)}}
      metrics.update(amp_mask_frac=jnp.mean(mask.astype(jnp.float32)),
                     amp_loss_adv=jnp.mean(loss_adv), amp_weight_max=jnp.max(weights),
                     amp_window_count=count)
    prepared = _with_coeffs(prepared, jax.lax.stop_gradient(lam_final),
                            jax.lax.stop_gradient(lam_y_final))
    draw = ReweightedDraw(*prepared.draw, weights=jax.lax.stop_gradient(weights),
                          state=new_state)
    metrics = jax.lax.stop_gradient(metrics)
    return prepared._replace(draw=draw, metrics={**prepared.metrics, **metrics})

  def forward(self, apply, variables, inputs, prepared):
    """The base's final pass; the released variant's new window joins the new model state."""
    if self.variant != "released":
      return self.base.forward(apply, variables, inputs, prepared)
    variables = {k: v for k, v in dict(variables).items() if k != STATE_COLLECTION}
    outputs, state = self.base.forward(apply, variables, inputs, prepared)
    return outputs, {**dict(state), **getattr(prepared.draw, "state", {})}

  def per_example(self, outputs, draw):
    """The base's per-example losses, times the released variant's weights (f32[B])."""
    values = self.base.per_example(outputs, draw)
    weights = getattr(draw, "weights", None)
    return values if weights is None else weights * values


def _chain(objective: Any):
  """`objective` and the bases below it."""
  while objective is not None:
    yield objective
    objective = getattr(objective, "base", None) if isinstance(objective,
                                                               objectives.Wrapper) else None


def lam_grad(loss_fn: Callable[[jax.Array], jax.Array], lam: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
  """`(d/d lam sum_i loss_fn(lam)_i, loss_fn(lam))`, both f32[B]: the Max step's gradient."""
  def summed(l):
    values = loss_fn(l)
    return jnp.sum(values), values
  return jax.grad(summed, has_aux=True)(lam)


def _with_coeffs(prepared: objectives.Prepared, lam_x: jax.Array,
                 lam_y: jax.Array) -> objectives.Prepared:
  """`prepared` with both coefficients replaced."""
  coeffs = policies.Coefficients(lam_x, lam_y)
  return prepared._replace(draw=prepared.draw._replace(coeffs=coeffs))


def window_row(delta: jax.Array) -> jax.Array:
  """f32[3]: (count, mean, sum of squared deviations) of the positive entries of `delta` f32[B]."""
  pos = (delta > 0).astype(jnp.float32)
  count = jnp.sum(pos)
  mean = jnp.sum(pos * delta) / jnp.maximum(count, 1.0)
  m2 = jnp.sum(pos * jnp.square(delta - mean))
  return jnp.stack([count, mean, m2]).astype(jnp.float32)


def push_window(window: jax.Array, row: jax.Array) -> jax.Array:
  """The window f32[W, 3] without its oldest row, `row` f32[3] appended last."""
  return jnp.concatenate([window[1:], row[None].astype(window.dtype)], axis=0)


def window_moments(window: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(count, mean, unbiased std) f32[] of all values summarised by the rows of `window` f32[W, 3].

  Rows are merged exactly (Chan et al.), so no values are stored. NaN-free:
  with no values the mean is 0 and with fewer than two the std is 0 (where
  the released code's `torch.std` is NaN); `released_weights` then gives 1.
  """
  n, means, m2s = window[:, 0], window[:, 1], window[:, 2]
  count = jnp.sum(n)
  mean = jnp.sum(n * means) / jnp.maximum(count, 1.0)
  m2 = jnp.sum(m2s) + jnp.sum(n * jnp.square(means - mean))
  std = jnp.where(count >= 2, jnp.sqrt(jnp.maximum(m2, 0.0) / jnp.maximum(count - 1.0, 1.0)), 0.0)
  return count, mean, std


def released_weights(delta: jax.Array, count: jax.Array, mean: jax.Array,
                     std: jax.Array) -> jax.Array:
  """`w_i = 1 + (delta_i - mean) / std` where `delta_i > mean`, else 1: f32[B].

  All ones where the window has fewer than two positive deltas or `std` is 0
  (all equal): the released code's weights are NaN there.
  """
  valid = (count >= 2) & (std > 0)
  safe_std = jnp.where(valid, std, 1.0)
  above = valid & (delta > mean)
  return jnp.where(above, 1.0 + (delta - mean) / safe_std, 1.0).astype(jnp.float32)


def amp(objective: objectives.Objective, eps: float = 0.002, mode: str = "full",
        clip: float = 1.0, variant: str = "paper", window: int = RELEASED_WINDOW) -> Amp:
  """AMP around a mixing objective (see `Amp`): variant 'paper' (default) or 'released'."""
  return Amp(objective, eps, mode, clip, variant, window)
