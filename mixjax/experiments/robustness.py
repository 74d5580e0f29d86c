"""Adversarial robustness of ERM and mixup models (mixup paper, Table 3; Zhang et al. 2021, C.1).

Three models of the same architecture: two trained with ERM (different seeds)
and one with mixup. White box: the first ERM model and the mixup model are
attacked through their own gradients. Black box: examples made on the first
ERM model are shown to the second ERM model and to the mixup model. Attacks:
FGSM and I-FGSM (10 steps of eps/10), l_inf (or l2 with --norm l2), inputs
clipped to the valid range. Also: white-box FGSM error as a function of eps.

By default the models are small ResNets trained on scikit-learn's 8x8 digits
(inputs in [0, 1]). `--checkpoint NAME=WORKDIR` (repeatable) evaluates runs of
`train.py` instead (the model is rebuilt from the config saved with the
checkpoint through `mixjax.models.get_model`; the data from its eval split;
the valid range is the range of those inputs): the first is the black-box
source, the others its targets, and every one is attacked white-box.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
import optax

from mixjax import attacks
from mixjax import objectives
from mixjax.experiments import _common as common

NAME = "robustness"
ApplyFn = Callable[[jax.Array], jax.Array]


def train_models(args, quick: bool) -> tuple[dict[str, ApplyFn], np.ndarray, np.ndarray]:
  """{'ERM', 'ERM (2nd)', 'mixup'} apply functions trained on digits, and the test set."""
  x, y = common.digits_images()
  tr, te = common.split(y, 0.2, args.seed)
  module = common.ResNet(width=32, num_classes=10, conv=not quick)
  epochs = args.epochs or (3 if quick else 30)
  tx = optax.adam(2e-3)
  runs = {"ERM": (objectives.erm(num_classes=10), args.seed, None),
          "ERM (2nd)": (objectives.erm(num_classes=10), args.seed + 1, None),
          "mixup": (None, args.seed, (args.alpha, None))}
  erm_fn = lambda lam: runs["ERM"][0]  # noqa: E731
  mix_fn = lambda lam: objectives.mixup(common.fixed_policy(lam), num_classes=10)  # noqa: E731
  models = {}
  for name, (_, seed, mix) in runs.items():
    fit = common.fit(module, common.init(module, x[tr], seed), mix_fn if mix else erm_fn,
                     x[tr], y[tr], tx=tx, epochs=epochs, batch_size=64, seed=seed, mix=mix)
    models[name] = common.predictor(module, fit.variables)
  return models, x[te], y[te]


def load_run(workdir: str, module: Any = None, ema: bool = False):
  """(apply_fn, config) of the latest checkpoint of a `train.py` run in `workdir`.

  The state is restored without a template (no optimizer needed). `module`
  defaults to `mixjax.models.get_model(config.model.name, ...)`.
  """
  import ml_collections
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")))
  step = manager.latest_step()
  if step is None:
    raise ValueError(f"no checkpoint under {workdir}/checkpoints.")
  out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                      meta=ocp.args.JsonRestore()))
  manager.close()
  config = ml_collections.ConfigDict(json.loads(out.meta["config"]))
  state = out.state
  params = state["ema_params"] if ema and state.get("ema_params") else state["params"]
  model_state = state["ema_model_state"] if ema and state.get("ema_params") else state.get(
      "model_state", {})
  if module is None:
    from mixjax import models
    kwargs = dict(config.model.kwargs)
    classes = config.mix.cosine_dim if config.mix.loss == "cosine" else config.dataset.num_classes
    module = models.get_model(config.model.name, num_classes=classes, **kwargs)
  variables = {"params": params, **(model_state or {})}
  return (lambda v: module.apply(variables, v, train=False)), config


def load_runs(specs: Sequence[str], ema: bool, max_examples: Optional[int]):
  """Models and eval data for `NAME=WORKDIR` specs (see the module docstring)."""
  from mixjax import input_pipeline
  models, config = {}, None
  for spec in specs:
    name, sep, workdir = spec.partition("=")
    if not sep or not name or not workdir:
      raise ValueError(f"--checkpoint takes NAME=WORKDIR, got {spec!r}.")
    models[name], config = load_run(workdir, ema=ema)
  data = input_pipeline.load_arrays(config.dataset, seed=config.seed)["eval"]
  x, y = data.get(np.arange(min(len(data), max_examples or len(data))))
  return models, np.asarray(x, np.float32), np.asarray(y, np.int32)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = common.make_parser(NAME, __doc__)
  parser.add_argument("--eps", type=float, default=None,
                      help="attack radius in input units (default 0.05, l2: 0.5)")
  parser.add_argument("--norm", choices=attacks.NORMS, default="linf")
  parser.add_argument("--steps", type=int, default=10, help="I-FGSM iterations")
  parser.add_argument("--alpha", type=float, default=1.0, help="mixup Beta(alpha, alpha)")
  parser.add_argument("--epochs", type=int, default=None, help="default 30 (--quick: 3)")
  parser.add_argument("--checkpoint", action="append", default=[],
                      help="NAME=WORKDIR of a train.py run (repeat; first = black-box source)")
  parser.add_argument("--ema", action="store_true", help="use the checkpoints' EMA weights")
  parser.add_argument("--max_examples", type=int, default=None)
  args = common.parse(parser, argv)
  eps = args.eps if args.eps is not None else (0.05 if args.norm == "linf" else 0.5)

  if args.checkpoint:
    models, x, y = load_runs(args.checkpoint, args.ema, args.max_examples)
    clip = (float(x.min()), float(x.max()))
    names = list(models)
    source, white_names, black_names = names[0], names, names[1:]
  else:
    models, x, y = train_models(args, args.quick)
    if args.max_examples:
      x, y = x[:args.max_examples], y[:args.max_examples]
    clip = (0.0, 1.0)
    source, white_names, black_names = "ERM", ["ERM", "mixup"], ["ERM (2nd)", "mixup"]

  kinds = {"FGSM": "fgsm", "I-FGSM": "ifgsm"}
  make = lambda method, e: attacks.Attack(method, e, args.norm, args.steps, None, *clip)  # noqa
  white = {label: {} for label in kinds}
  for label, method in kinds.items():
    for name in white_names:
      white[label].update(attacks.evaluate(models[name], {name: models[name]}, x, y,
                                           make(method, eps)))
  black = {label: attacks.evaluate(models[source], {n: models[n] for n in black_names}, x, y,
                                   make(method, eps))
           for label, method in kinds.items()} if black_names else {}
  tables = attacks.table3(white, black)
  clean_errors = {n: res.clean_top1 for results in (white["FGSM"], black.get("FGSM", {}))
                  for n, res in results.items()}
  clean = common.markdown_table(["Model", "Clean top-1 error (%)"],
                                [[n, common.pct(e, 1)] for n, e in clean_errors.items()])

  grid = eps * np.array([0.0, 0.25, 0.5, 1.0, 2.0, 4.0])
  curves = {n: [attacks.evaluate(models[n], {n: models[n]}, x, y, make("fgsm", e))[n].top1
                for e in grid] for n in white_names}
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(4.4, 3.2))
  for n, errs in curves.items():
    ax.plot(grid, 100 * np.asarray(errs), "o-", label=n)
  ax.set_xlabel(f"eps ({args.norm})")
  ax.set_ylabel("top-1 error under white-box FGSM (%)")
  ax.legend()
  figures = [common.save_figure(fig, args.out, "robustness_fgsm_eps.png")]

  notes = (f"{len(x)} test examples; {args.norm} radius eps = {eps:g} (inputs in "
           f"[{clip[0]:g}, {clip[1]:g}]); I-FGSM: {args.steps} steps of eps/{args.steps}. "
           f"Black box: examples made on '{source}'. Errors in %.")
  report = common.write_report(args.out, NAME, "Robustness to adversarial examples",
                               [tables, notes, clean, "![fgsm](robustness_fgsm_eps.png)"])
  return {"white": white, "black": black, "curves": curves, "eps": eps, "report": report,
          "figures": figures}


if __name__ == "__main__":
  main()
