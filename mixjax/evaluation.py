"""Test-set evaluation of a `TrainState`: the metrics `train.py` logs as 'eval' records.

`Evaluator` jits `train_step.eval_step` once and sums it over the eval
batches: loss (NLL for cross-entropy), top-1, top-5 and 15-bin ECE, for the
parameters and, with EMA, for the EMA parameters; on the final evaluation it
adds the top-1 accuracy under FGSM when `fgsm_eps` > 0 (`study.fgsm_error`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from mixjax import adapters
from mixjax import objectives
from mixjax import sharding
from mixjax import study
from mixjax import train_step as ts

Batches = Callable[[], Iterable[dict[str, Any]]]


class Evaluator:
  """Evaluates train states on the batches `eval_batches()` yields.

  Args:
    apply: the model in eval mode (`adapters.make_apply(module, train=False)`).
    objective: gives `loss_fn` and `to_logits` (the ERM objective of the run).
    eval_batches: returns an iterable of host batches {'inputs', 'labels'
      int32[B], 'mask' f32[B]}, placed with `batch_sharding`.
    num_classes: the number of classes C.
    ema: also evaluate the state's EMA parameters (key 'eval_ema').
    fgsm_eps: > 0: the final evaluation adds 'fgsm_top1' (radius as a fraction
      of the inputs' range, after `preprocess`).
    preprocess: applied to the inputs inside the jitted step (uint8 images ->
      normalised f32, `input_pipeline.device_normaliser`); None: as they are.
  """

  def __init__(self, apply: adapters.ApplyFn, objective: objectives.Objective,
               eval_batches: Batches, batch_sharding: NamedSharding, num_classes: int, *,
               ema: bool = False, fgsm_eps: float = 0.0,
               preprocess: Optional[Callable[[Any], Any]] = None):
    self.apply, self.objective, self.eval_batches = apply, objective, eval_batches
    self.preprocess = preprocess
    self.batch_sharding, self.ema, self.fgsm_eps = batch_sharding, ema, fgsm_eps
    self._step = jax.jit(functools.partial(
        ts.eval_step, apply=apply, num_classes=num_classes,
        loss_fn=getattr(objective, "loss_fn"), to_logits=getattr(objective, "to_logits"),
        preprocess=preprocess),
        out_shardings=NamedSharding(batch_sharding.mesh, P()))  # Inputs keep their shardings.

  def metrics(self, variables: dict[str, Any]) -> dict[str, float]:
    """{'loss', 'top1', 'top5', 'ece', 'confidence'} of `variables` over the eval set.

    Means over the examples; 'ece' and 'confidence' from 15-bin calibration sums.
    """
    sums = None
    for batch in self.eval_batches():
      out = self._step(variables, sharding.global_batch(batch, self.batch_sharding))
      sums = out if sums is None else jax.tree_util.tree_map(jnp.add, sums, out)
    sums = jax.device_get(sums)
    n = max(float(sums["count"]), 1.0)
    return {"loss": float(sums["loss"]) / n, "top1": float(sums["top1"]) / n,
            "top5": float(sums["top5"]) / n,
            "ece": ts.expected_calibration_error(sums["calibration"]),
            "confidence": ts.mean_confidence(sums["calibration"])}

  def __call__(self, state: ts.TrainState, final: bool = False) -> dict[str, dict[str, float]]:
    """{'eval': metrics[, 'eval_ema': metrics of the EMA parameters]} of `state`.

    `final`: add 'fgsm_top1' to 'eval' when `fgsm_eps` > 0.
    """
    variables = {"params": state.params, **state.model_state}
    out = {"eval": self.metrics(variables)}
    if final and self.fgsm_eps:
      logits = lambda x: self.objective.to_logits(self.apply(variables, x)[0])  # noqa: E731
      batches = self.eval_batches()
      if self.preprocess is not None:
        batches = ({**b, "inputs": self.preprocess(b["inputs"])} for b in batches)
      out["eval"]["fgsm_top1"] = 1.0 - study.fgsm_error(logits, batches, self.fgsm_eps)
    if self.ema:
      out["eval_ema"] = self.metrics({"params": state.ema_params, **state.ema_model_state})
    return out


def record(out: dict[str, dict[str, float]]) -> dict[str, float]:
  """The flat 'eval' log record of an `Evaluator` result: EMA keys prefixed 'ema_'."""
  return {**out["eval"], **{f"ema_{k}": v for k, v in out.get("eval_ema", {}).items()}}
