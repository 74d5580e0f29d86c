"""ERM, mixup, MixupE and AMP with the mixup paper's MLP on small tables (Iris, Wine, ...).

The mixup paper's UCI setup (Section 3.6, Table 4): a fully connected net with
two hidden layers of 128 ReLU units, Adam (lr 1e-3), minibatches of 16, 10
epochs. Here on the tables that ship with scikit-learn (Iris, Wine, Breast
cancer, Digits), standardised with training statistics, a stratified 80/20
split per seed; test errors are mean ± std over seeds. MixupE (mixjax.mixupe)
and AMP (mixjax.amp) rows appear when those modules are installed.
"""

from __future__ import annotations

import importlib.util
from typing import Optional, Sequence

import numpy as np
import optax

from mixjax import objectives
from mixjax.experiments import _common as common

NAME = "tabular"
DATASETS = ("iris", "wine", "breast_cancer", "digits")
PUBLISHED_IRIS = [
    ("mixup paper, Table 4 (batch 16, 10 epochs)", {"erm": "21.3", "mixup": "17.3"}),
    ("MixupE paper, Table 4 (batch 100, 25 epochs, 5 trials; alpha, eta tuned)",
     {"erm": "9.06 ± 7.01", "mixup": "8.14 ± 6.48", "mixupe": "7.29 ± 6.95"}),
]
LABELS = {"erm": "ERM", "mixup": "mixup", "mixupe": "MixupE", "amp": "AMP"}


def available_methods() -> list[str]:
  """'erm', 'mixup', and 'mixupe' / 'amp' when mixjax.mixupe / mixjax.amp exist."""
  out = ["erm", "mixup"]
  for name in ("mixupe", "amp"):
    if importlib.util.find_spec(f"mixjax.{name}") is not None:
      out.append(name)
  return out


def objective_fn(method: str, num_classes: int, alpha: float, eta: float, amp_eps: float):
  """`lam -> Objective` for a method name."""
  if method == "erm":
    return lambda lam: objectives.erm(num_classes=num_classes)
  base = lambda lam: objectives.mixup(common.fixed_policy(lam), num_classes=num_classes)  # noqa
  if method == "mixup":
    return base
  if method == "mixupe":
    from mixjax import mixupe
    return lambda lam: mixupe.mixupe(base(lam), alpha=alpha, eta=eta)
  if method == "amp":
    from mixjax import amp
    return lambda lam: amp.amp(base(lam), eps=amp_eps)
  raise ValueError(f"Unknown method {method!r}; choose from {list(LABELS)}.")


def run(dataset: str, method: str, seeds: Sequence[int], *, epochs: int, batch_size: int,
        alpha: float, eta: float, amp_eps: float, test_fraction: float,
        hidden: Sequence[int]) -> list[float]:
  """Test errors (fractions) of one method on one dataset, one per seed."""
  x, y, num_classes = common.load_tabular(dataset)
  module = common.MLP(tuple(hidden), num_classes)
  obj, tx = objective_fn(method, num_classes, alpha, eta, amp_eps), optax.adam(1e-3)
  errors = []
  for seed in seeds:
    tr, te = common.split(y, test_fraction, seed)
    xtr, xte = common.standardize(x[tr], x[te])
    fit = common.fit(module, common.init(module, xtr, seed), obj, xtr, y[tr], tx=tx,
                     epochs=epochs, batch_size=batch_size, seed=seed,
                     mix=None if method == "erm" else (alpha, None))
    errors.append(common.error_rate(common.predict(module, fit.variables, xte), y[te]))
  return errors


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = common.make_parser(NAME, __doc__)
  parser.add_argument("--datasets", type=common.csv_names, default=None,
                      help=f"default: {','.join(DATASETS)} (--quick: iris,wine)")
  parser.add_argument("--methods", type=common.csv_names, default=None,
                      help="default: erm, mixup, and mixupe, amp where available")
  parser.add_argument("--seeds", type=int, default=None, help="default 5 (--quick: 2)")
  parser.add_argument("--epochs", type=int, default=None, help="default 10 (--quick: 2)")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--alpha", type=float, default=1.0, help="mixup Beta(alpha, alpha)")
  parser.add_argument("--eta", type=float, default=1e-4, help="MixupE eta")
  parser.add_argument("--amp_eps", type=float, default=0.002, help="AMP step size")
  parser.add_argument("--test_fraction", type=float, default=0.2)
  args = common.parse(parser, argv)
  seeds = args.seeds or (2 if args.quick else 5)
  epochs = args.epochs or (2 if args.quick else 10)
  hidden = (32, 32) if args.quick else (128, 128)
  methods = args.methods or available_methods()
  args.datasets = args.datasets or (["iris", "wine"] if args.quick else list(DATASETS))
  missing = [m for m in ("mixupe", "amp") if m not in available_methods()]
  for m in methods:
    if m not in LABELS:
      parser.error(f"unknown method {m!r}; choose from {list(LABELS)}")
  for d in args.datasets:
    if d not in DATASETS:
      parser.error(f"unknown dataset {d!r}; choose from {list(DATASETS)}")

  errors = {(d, m): run(d, m, [args.seed + s for s in range(seeds)], epochs=epochs,
                        batch_size=args.batch_size, alpha=args.alpha, eta=args.eta,
                        amp_eps=args.amp_eps, test_fraction=args.test_fraction, hidden=hidden)
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
  if missing:
    notes.append(f"Left out (module not installed): {', '.join(LABELS[m] for m in missing)}.")

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
