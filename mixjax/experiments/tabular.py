"""ERM, mixup, MixupE and AMP with the mixup paper's MLP on small tables (Iris, Wine, ...).

The mixup paper's UCI setup (Section 3.6, Table 4): a fully connected net with
two hidden layers of 128 ReLU units, Adam (lr 1e-3), minibatches of 16, 10
epochs. Here on the tables that ship with scikit-learn (Iris, Wine, Breast
cancer, Digits), standardised with training statistics, a stratified 80/20
split per seed; test errors are mean ± std over seeds. The model is the zoo's
`mlp`; the methods are `mixjax.methods.get_objective` names (MixupE:
`mixjax.mixupe`, AMP: `mixjax.amp`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import optax

from mixjax import methods
from mixjax import models
from mixjax import objectives
from mixjax.experiments import common
from mixjax.experiments import data
from mixjax.experiments import training
from mixjax.input_pipeline import sources

NAME = "tabular"
DATASETS = data.TABLES
PUBLISHED_IRIS = [
    ("mixup paper, Table 4 (batch 16, 10 epochs)", {"erm": "21.3", "mixup": "17.3"}),
    ("MixupE paper, Table 4 (batch 100, 25 epochs, 5 trials; alpha, eta tuned)",
     {"erm": "9.06 ± 7.01", "mixup": "8.14 ± 6.48", "mixupe": "7.29 ± 6.95"}),
]
LABELS = {"erm": "ERM", "mixup": "mixup", "mixupe": "MixupE", "amp": "AMP"}


def objective(method: str, num_classes: int, alpha: float, eta: float,
              amp_eps: float) -> objectives.Objective:
  """The objective of a method name in `LABELS` (`mixjax.methods.get_objective`)."""
  if method not in LABELS:
    raise ValueError(f"Unknown method {method!r}; choose from {list(LABELS)}.")
  return methods.get_objective(method, num_classes=num_classes, alpha=alpha,
                               mixupe={"eta": eta}, amp={"eps": amp_eps})


def run(dataset: str, method: str, seeds: Sequence[int], *, epochs: int, batch_size: int,
        alpha: float, eta: float, amp_eps: float, test_fraction: float,
        hidden: Sequence[int], tx: optax.GradientTransformation,
        fast: bool = False) -> list[float]:
  """Test errors (fractions) of one method on one dataset, one per seed."""
  x, y, num_classes = data.load_tabular(dataset)
  model = models.get_model("mlp", num_classes=num_classes, hidden_sizes=tuple(hidden))
  obj = objective(method, num_classes, alpha, eta, amp_eps)
  errors = []
  for seed in seeds:
    tr, te = data.split(y, test_fraction, seed)
    xtr, xte = sources.standardise(x[tr], x[te])
    fit = training.fit(model, obj, xtr, y[tr], tx=tx, epochs=epochs, batch_size=batch_size,
                       seed=seed, test=(xte, y[te]), num_classes=num_classes, fast=fast)
    errors.append(fit.history[-1]["test_error"])
  return errors


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = common.make_parser(NAME, __doc__)
  parser.add_argument("--datasets", type=common.csv_names, default=None,
                      help=f"default: {','.join(DATASETS)} (--quick: iris,wine)")
  parser.add_argument("--methods", type=common.csv_names, default=None,
                      help=f"default: {','.join(LABELS)}")
  parser.add_argument("--seeds", type=int, default=None, help="default 5 (--quick: 2)")
  parser.add_argument("--epochs", type=int, default=None, help="default 10 (--quick: 2)")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--alpha", type=float, default=1.0, help="mixup Beta(alpha, alpha)")
  parser.add_argument("--eta", type=float, default=1e-4, help="MixupE eta")
  parser.add_argument("--amp_eps", type=float, default=0.002, help="AMP step size")
  parser.add_argument("--test_fraction", type=float, default=0.2)
  args = parser.parse_args(argv)
  seeds = args.seeds or (2 if args.quick else 5)
  epochs = args.epochs or (2 if args.quick else 10)
  hidden = (32, 32) if args.quick else (128, 128)
  methods = args.methods or list(LABELS)
  args.datasets = args.datasets or (["iris", "wine"] if args.quick else list(DATASETS))
  for m in methods:
    if m not in LABELS:
      parser.error(f"unknown method {m!r}; choose from {list(LABELS)}")
  for d in args.datasets:
    if d not in DATASETS:
      parser.error(f"unknown dataset {d!r}; choose from {list(DATASETS)}")

  tx = optax.adam(1e-3)  # One object for every run: runs of a table and method compile once.
  errors = {(d, m): run(d, m, [args.seed + s for s in range(seeds)], epochs=epochs,
                        batch_size=args.batch_size, alpha=args.alpha, eta=args.eta,
                        amp_eps=args.amp_eps, test_fraction=args.test_fraction, hidden=hidden,
                        tx=tx, fast=args.quick)
            for d in args.datasets for m in methods}

  rows = [[d] + [common.mean_std(errors[d, m]) for m in methods] for d in args.datasets]
  for source, vals in PUBLISHED_IRIS:
    rows.append([f"Iris, published: {source}"] + [vals.get(m, "–") for m in methods])
  table = common.markdown_table(["Dataset"] + [LABELS[m] for m in methods], rows)
  notes = [f"Test error (%), mean ± std over {seeds} seeds (split and initialisation); MLP "
           f"{'x'.join(map(str, hidden))} ReLU, Adam 1e-3, batch {args.batch_size}, {epochs} "
           f"epochs, mixup alpha={args.alpha}"
           + (f", MixupE eta={args.eta}" if "mixupe" in methods else "")
           + (f", AMP eps={args.amp_eps}" if "amp" in methods else "") + "."]

  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(args.datasets), 3.2))
  width = 0.8 / len(methods)
  for k, m in enumerate(methods):
    means = [100 * np.mean(errors[d, m]) for d in args.datasets]
    stds = [100 * np.std(errors[d, m]) for d in args.datasets]
    ax.bar(np.arange(len(args.datasets)) + k * width, means, width, yerr=stds, label=LABELS[m])
  ax.set_xticks(np.arange(len(args.datasets)) + 0.4 - width / 2, args.datasets)
  ax.set_ylabel("test error (%)")
  ax.legend()
  fig_path = common.save_figure(fig, args.out, "tabular_errors.png")
  report = common.write_report(args.out, NAME, "Small tables: ERM vs mixup (and variants)",
                               [table, "\n\n".join(notes), "![errors](tabular_errors.png)"])
  return {"errors": errors, "methods": methods, "report": report, "figures": [fig_path]}


if __name__ == "__main__":
  main()
