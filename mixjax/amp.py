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

Mixing at a hidden layer. With `adapters.make_apply` (linen interception),
every pass runs the whole model: the layers below the mixing point run three
times in the program (forward only in the two extra passes; XLA may merge the
identical computations, see benchmarks/methods_overhead.py). For a model
split into `encode(x) -> h` and `head(h) -> outputs` (an
`adapters.SplitApply`, e.g. from `adapters.make_split_apply`) and
`base.point == apply.point`, the encoder runs
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
from typing import Any, Callable

import jax
import jax.numpy as jnp

from mixjax import adapters
from mixjax import checks
from mixjax import objectives

PyTree = Any
MODES = ("rand", "max", "full")


@dataclasses.dataclass(frozen=True)
class Amp(objectives.Wrapper):
  """AMP around a mixing objective (see the module docstring).

  base: an objective with `base.mixes` and `base.decomposes` (e.g.
    `objectives.Mixup`: any policy, input or hidden mixing point).
  eps: step size of the Max step (>= 0; the paper's 0.002).
  mode: 'rand', 'max' or 'full'.
  clip: the Max step's gradient is clipped to [-clip, clip] (the paper: 1).
  """
  eps: float = 0.002
  mode: str = "full"
  clip: float = 1.0

  def __post_init__(self):
    super().__post_init__()
    if not getattr(self.base, "mixes", False):
      raise ValueError(f"amp perturbs the mixing coefficient, so it wraps an objective that "
                       f"mixes (mixup, untied, dat); {type(self.base).__name__} does not mix.")
    if not getattr(self.base, "decomposes", False):
      raise ValueError(f"amp compares per-example losses, so its base's loss must be a mean of "
                       f"per-example losses; {type(self.base).__name__}'s is not. Put amp "
                       f"inside: mixupe(amp(base)), not amp(mixupe(base)).")
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

  def fast_path(self, apply: adapters.ApplyFn) -> bool:
    """Whether the encoder runs once (a `SplitApply` mixed at its split point)."""
    return (isinstance(apply, adapters.SplitApply) and self.point is not None
            and self.point == apply.point)

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
    prepared = self.base.prepare(apply, variables, inputs, labels, key)
    if self.mode == "rand":
      return prepared
    batch = checks.batch_size("inputs", inputs)
    lam = jnp.broadcast_to(jnp.asarray(prepared.draw.coeffs.lam_x, jnp.float32), (batch,))
    prepared = objectives.with_lam_x(prepared, lam)
    if self.fast_path(apply) and prepared.encoded is None:
      prepared = prepared._replace(encoded=apply.run_encoder(variables, inputs, prepared.key))

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


def amp(objective: objectives.Objective, eps: float = 0.002, mode: str = "full",
        clip: float = 1.0) -> Amp:
  """AMP around a mixing objective (see `Amp`)."""
  return Amp(objective, eps, mode, clip)
