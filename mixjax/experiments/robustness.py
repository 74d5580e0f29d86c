"""Adversarial robustness of ERM and mixup models (mixup paper, Table 3; Zhang et al. 2021, C.1).

Three models of the same architecture: two trained with ERM (different seeds)
and one with mixup. White box: the first ERM model and the mixup model are
attacked through their own gradients. Black box: examples made on the first
ERM model are shown to the second ERM model and to the mixup model. Attacks:
FGSM and I-FGSM (10 steps of eps/10), l_inf (or l2 with --norm l2), inputs
clipped to the valid range. Also: white-box FGSM error as a function of eps.

By default the models are the zoo's small pre-activation ResNet
(`preact_resnet_small`) trained on scikit-learn's 8x8 digits (inputs in
[0, 1]). `--checkpoint NAME=WORKDIR` (repeatable) evaluates runs of
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
from mixjax import methods
from mixjax import models
from mixjax.experiments import common
from mixjax.experiments import data
from mixjax.experiments import training

NAME = "robustness"
ApplyFn = Callable[[jax.Array], jax.Array]


def train_models(args, quick: bool, seed: Optional[int] = None
                 ) -> tuple[dict[str, ApplyFn], np.ndarray, np.ndarray]:
  """{'ERM', 'ERM (2nd)', 'mixup'} apply functions trained on digits, and the test set.

  `seed` (default args.seed) draws the split and the initialisations: 'ERM' and
  'mixup' start from seed, 'ERM (2nd)' from seed + 1000.
  """
  seed = args.seed if seed is None else seed
  x, y = data.digits_images()
  tr, te = data.split(y, 0.2, seed)
  model = models.get_model("preact_resnet_small", num_classes=10, width=32, conv=not quick)
  epochs = args.epochs or (3 if quick else 30)
  tx = optax.adam(2e-3)
  erm = methods.get_objective("erm", num_classes=10)
  runs = {"ERM": (erm, seed), "ERM (2nd)": (erm, seed + 1000),
          "mixup": (methods.get_objective("mixup", num_classes=10, alpha=args.alpha), seed)}
  out = {}
  for name, (objective, seed) in runs.items():
    fit = training.fit(model, objective, x[tr], y[tr], tx=tx, epochs=epochs, batch_size=64,
                       seed=seed, fast=quick)
    out[name] = training.predictor(model, fit.variables)
  return out, x[te], y[te]


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
    kwargs = dict(config.model.kwargs)
    classes = config.mix.cosine_dim if config.mix.loss == "cosine" else config.dataset.num_classes
    module = models.get_model(config.model.name, num_classes=classes, **kwargs)
  variables = {"params": params, **(model_state or {})}
  return (lambda v: module.apply(variables, v, train=False)), config


def load_runs(specs: Sequence[str], ema: bool, max_examples: Optional[int]):
  """Models and eval data for `NAME=WORKDIR` specs (see the module docstring)."""
  from mixjax import input_pipeline
  nets, config = {}, None
  for spec in specs:
    name, sep, workdir = spec.partition("=")
    if not sep or not name or not workdir:
      raise ValueError(f"--checkpoint takes NAME=WORKDIR, got {spec!r}.")
    nets[name], config = load_run(workdir, ema=ema)
  evals = input_pipeline.load_arrays(config.dataset, seed=config.seed)["eval"]
  x, y = evals.get(np.arange(min(len(evals), max_examples or len(evals))))
  return nets, np.asarray(x, np.float32), np.asarray(y, np.int32)


def attack_all(nets: dict[str, ApplyFn], x: np.ndarray, y: np.ndarray, *, eps: float,
               norm: str, steps: int, clip: tuple[float, float], source: str,
               white_names: Sequence[str], black_names: Sequence[str]) -> dict:
  """White-box and black-box FGSM / I-FGSM results and the white-box FGSM error against
  eps (grid eps * [0, 1/4, 1/2, 1, 2, 4]) of `nets` on (x f32[N, ...], y int32[N])."""
  kinds = {"FGSM": "fgsm", "I-FGSM": "ifgsm"}
  make = lambda method, e: attacks.Attack(method, e, norm, steps, None, *clip)  # noqa
  white = {label: {} for label in kinds}
  for label, method in kinds.items():
    for name in white_names:
      white[label].update(attacks.evaluate(nets[name], {name: nets[name]}, x, y,
                                           make(method, eps)))
  black = {label: attacks.evaluate(nets[source], {n: nets[n] for n in black_names}, x, y,
                                   make(method, eps))
           for label, method in kinds.items()} if black_names else {}
  grid = eps * np.array([0.0, 0.25, 0.5, 1.0, 2.0, 4.0])
  curves = {n: [attacks.evaluate(nets[n], {n: nets[n]}, x, y, make("fgsm", e))[n].top1
                for e in grid] for n in white_names}
  return {"white": white, "black": black, "curves": curves, "grid": grid}


def table3_over_seeds(per_seed: Sequence[dict]) -> str:
  """The Table 3 layout with cells mean ± std (population, %) over the seeds' results."""
  def one(title, key):
    results = [r[key] for r in per_seed]
    labels = list(results[0])
    names = list(results[0][labels[0]])
    rows = []
    for metric in ("top1", "top5"):
      for i, m in enumerate(names):
        head = ("Top-1" if metric == "top1" else "Top-5") if i == 0 else ""
        rows.append([head, m] + [common.mean_std([getattr(r[a][m], metric) for r in results], 1)
                                 for a in labels])
    return f"{title}\n\n" + common.markdown_table(["Metric", "Method"] + labels, rows)
  text = one("(a) White box attacks.", "white")
  return text + "\n\n" + one("(b) Black box attacks.", "black") if per_seed[0]["black"] else text


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = common.make_parser(NAME, __doc__)
  parser.add_argument("--eps", type=float, default=None,
                      help="attack radius in input units (default 0.05, l2: 0.5)")
  parser.add_argument("--norm", choices=attacks.NORMS, default="linf")
  parser.add_argument("--steps", type=int, default=10, help="I-FGSM iterations")
  parser.add_argument("--alpha", type=float, default=1.0, help="mixup Beta(alpha, alpha)")
  parser.add_argument("--epochs", type=int, default=None, help="default 30 (--quick: 3)")
  parser.add_argument("--seeds", type=int, default=None,
                      help="trained models only: default 1; each seed (seed, seed + 1, ...) "
                           "draws its own split and initialisations; cells mean ± std")
  parser.add_argument("--checkpoint", action="append", default=[],
                      help="NAME=WORKDIR of a train.py run (repeat; first = black-box source)")
  parser.add_argument("--ema", action="store_true", help="use the checkpoints' EMA weights")
  parser.add_argument("--max_examples", type=int, default=None)
  args = parser.parse_args(argv)
  eps = args.eps if args.eps is not None else (0.05 if args.norm == "linf" else 0.5)
  if args.seeds is not None and (args.seeds < 1 or args.checkpoint):
    parser.error(f"--seeds takes a positive count and no --checkpoint, got {args.seeds}")
  seeds = [args.seed + i for i in range(args.seeds or 1)]

  per_seed = []
  for seed in seeds:
    if args.checkpoint:
      nets, x, y = load_runs(args.checkpoint, args.ema, args.max_examples)
      clip = (float(x.min()), float(x.max()))
      names = list(nets)
      source, white_names, black_names = names[0], names, names[1:]
    else:
      nets, x, y = train_models(args, args.quick, seed)
      if args.max_examples:
        x, y = x[:args.max_examples], y[:args.max_examples]
      clip = (0.0, 1.0)
      source, white_names, black_names = "ERM", ["ERM", "mixup"], ["ERM (2nd)", "mixup"]
    per_seed.append(attack_all(nets, x, y, eps=eps, norm=args.norm, steps=args.steps,
                               clip=clip, source=source, white_names=white_names,
                               black_names=black_names))
    print(f"[seed {seed}: attacked]", flush=True)
  first = per_seed[0]
  white, black, curves, grid = first["white"], first["black"], first["curves"], first["grid"]

  if len(seeds) == 1:
    tables = attacks.table3(white, black)
  else:
    tables = table3_over_seeds(per_seed)
  clean_rows = []
  for n in list(white["FGSM"]) + [n for n in black.get("FGSM", {}) if n not in white["FGSM"]]:
    errs = [(r["white"]["FGSM"].get(n) or r["black"]["FGSM"][n]).clean_top1 for r in per_seed]
    clean_rows.append([n, common.mean_std(errs, 1) if len(seeds) > 1 else common.pct(errs[0], 1)])
  clean = common.markdown_table(["Model", "Clean top-1 error (%)"], clean_rows)

  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(4.4, 3.2))
  for n in curves:
    errs = np.mean([r["curves"][n] for r in per_seed], 0)
    ax.plot(grid, 100 * errs, "o-", label=n)
  ax.set_xlabel(f"eps ({args.norm})")
  ax.set_ylabel("top-1 error under white-box FGSM (%)")
  ax.legend()
  figures = [common.save_figure(fig, args.out, "robustness_fgsm_eps.png")]

  seed_txt = ("" if len(seeds) == 1 else
              f"Mean ± std (population) over {len(seeds)} seeds ({seeds[0]}..{seeds[-1]}), "
              "each its own split and initialisations (figure: mean curves). ")
  notes = (f"{seed_txt}{len(x)} test examples; {args.norm} radius eps = {eps:g} (inputs in "
           f"[{clip[0]:g}, {clip[1]:g}]); I-FGSM: {args.steps} steps of eps/{args.steps}. "
           f"Black box: examples made on '{source}'. Errors in %.")
  report = common.write_report(args.out, NAME, "Robustness to adversarial examples",
                               [tables, notes, clean, "![fgsm](robustness_fgsm_eps.png)"])
  return {"white": white, "black": black, "curves": curves, "eps": eps, "per_seed": per_seed,
          "seeds": seeds, "report": report, "figures": figures}


if __name__ == "__main__":
  main()
