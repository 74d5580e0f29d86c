"""A study: each method over seeds (and with corrupted labels), summarised as one table.

`config.study` turns one `train.py` run into a comparison (the default digits
run uses it to show what mixup buys over ERM):

  seeds: train every method with seeds `config.seed, config.seed + 1, ...`.
  fgsm_eps: > 0 adds the top-1 error under white-box FGSM (l_inf) with radius
    `fgsm_eps` times the test inputs' range (max - min), inputs clipped to it.
  corrupted_labels: > 0 trains every method and seed once more with that
    fraction of training labels replaced by random ones, and reports its test
    error.

The table (mean +- std over seeds) has test error, negative log-likelihood,
15-bin expected calibration error, mean confidence minus accuracy (> 0:
over-confident, < 0: under-confident), FGSM error and the corrupted-label
error.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Iterable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mixjax import attacks


class Run(NamedTuple):
  """One training run of a study: a method, a seed and a label-corruption fraction."""
  method: str
  seed: int
  corruption: float

  def subdir(self, study: bool) -> str:
    """The run's sub-folder of the workdir: '<method>', or '<method>/seed<s>[_corrupt<c>]'."""
    if not study:
      return self.method
    tail = f"seed{self.seed}" + (f"_corrupt{self.corruption:g}" if self.corruption else "")
    return os.path.join(self.method, tail)


def runs(config: ml_collections.ConfigDict, methods: list[str]) -> list[Run]:
  """The runs of `config`: methods x seeds x (clean, corrupted), clean runs first."""
  s = config.study
  seeds = [config.seed + i for i in range(int(s.seeds))]
  fractions = [config.dataset.label_corruption]
  if s.corrupted_labels:
    fractions.append(float(s.corrupted_labels))
  return [Run(m, seed, c) for c in fractions for seed in seeds for m in methods]


def is_study(config: ml_collections.ConfigDict) -> bool:
  """Whether `config.study` asks for more than the plain per-method runs."""
  s = config.study
  return int(s.seeds) > 1 or s.fgsm_eps > 0 or s.corrupted_labels > 0


def config_for(config: ml_collections.ConfigDict, run: Run) -> ml_collections.ConfigDict:
  """`config` with the run's seed and label corruption."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.seed = run.seed
  c.dataset.label_corruption = run.corruption
  return c


def fgsm_error(logits_fn: Callable[[jax.Array], jax.Array],
               batches: Iterable[dict[str, np.ndarray]], eps_fraction: float) -> float:
  """Top-1 error under l_inf FGSM of radius `eps_fraction * (max - min)` of the inputs.

  logits_fn: `x f32[B, ...] -> logits f32[B, C]` in eval mode.
  batches: eval batches {'inputs', 'labels' int32[B], 'mask' f32[B]}.
  """
  batches = list(batches)
  lo = min(float(np.min(b["inputs"])) for b in batches)
  hi = max(float(np.max(b["inputs"])) for b in batches)
  eps = eps_fraction * (hi - lo)
  attack = jax.jit(lambda x, y: jnp.argmax(logits_fn(
      attacks.fgsm(logits_fn, x, y, eps, clip_min=lo, clip_max=hi)), -1))
  wrong = count = 0.0
  for b in batches:
    pred = np.asarray(attack(jnp.asarray(b["inputs"]), jnp.asarray(b["labels"])))
    mask = np.asarray(b.get("mask", np.ones(len(pred))), np.float64)
    wrong += float(np.sum((pred != np.asarray(b["labels"])) * mask))
    count += float(mask.sum())
  return wrong / max(count, 1.0)


COLUMNS = (("error", "test error %"), ("nll", "NLL"), ("ece", "ECE %"),
           ("overconfidence", "confidence - accuracy %"),
           ("fgsm_error", "FGSM error %"), ("corrupted_error", "error, corrupted labels %"))


def _mean_std(values: list[float], scale: float) -> str:
  if not values:
    return "–"
  v = np.asarray(values, np.float64) * scale
  digits = 2 if scale == 100.0 else 3
  std = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
  return f"{v.mean():.{digits}f} ± {std:.{digits}f}" if math.isfinite(std) else (
      f"{v.mean():.{digits}f}")


def summarize(config: ml_collections.ConfigDict, results: list[tuple[Run, dict[str, Any]]]
              ) -> tuple[str, dict[str, Any]]:
  """(Markdown table, JSON-able dict) of per-method mean +- std over seeds."""
  methods = list(dict.fromkeys(run.method for run, _ in results))
  seeds = sorted({run.seed for run, _ in results})
  base_corruption = config.dataset.label_corruption
  per_method: dict[str, dict[str, list[float]]] = {m: {k: [] for k, _ in COLUMNS}
                                                   for m in methods}
  for run, res in results:
    ev = res["eval"]
    cols = per_method[run.method]
    if run.corruption == base_corruption:
      cols["error"].append(1.0 - ev["top1"])
      cols["nll"].append(ev["loss"])
      cols["ece"].append(ev["ece"])
      if "confidence" in ev:  # Absent from runs logged before it was measured.
        cols["overconfidence"].append(ev["confidence"] - ev["top1"])
      if "fgsm_top1" in ev:
        cols["fgsm_error"].append(1.0 - ev["fgsm_top1"])
    else:
      cols["corrupted_error"].append(1.0 - ev["top1"])
  shown = [(k, title) for k, title in COLUMNS if any(per_method[m][k] for m in methods)]
  s = config.study
  lines = [f"{len(seeds)} seeds ({', '.join(map(str, seeds))}), mean ± std; "
           f"{config.dataset.name}, {config.model.name}, {config.total_steps or config.num_epochs}"
           f" {'steps' if config.total_steps else 'epochs'}, alpha = {config.mix.alpha:g}"
           + (f"; FGSM l_inf eps = {s.fgsm_eps:g} of the input range" if s.fgsm_eps else "")
           + (f"; {100 * s.corrupted_labels:g}% of training labels corrupted in the last column"
              if s.corrupted_labels else "") + ".", "",
           "| method | " + " | ".join(t for _, t in shown) + " |",
           "|---|" + "---|" * len(shown)]
  for m in methods:
    cells = [_mean_std(per_method[m][k], 1.0 if k == "nll" else 100.0) for k, _ in shown]
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  table = "\n".join(lines)
  data = {"seeds": seeds, "methods": {m: per_method[m] for m in methods},
          "study": s.to_dict()}
  return table, data


def write(workdir: Optional[str], table: str, data: dict[str, Any]) -> None:
  """Writes `summary.md` and `summary.json` into `workdir` (nothing without one)."""
  if not workdir:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(data, f, indent=1)
