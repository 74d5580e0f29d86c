"""Memorisation of corrupted labels: ERM, dropout, mixup (mixup paper, Table 2).

A fraction of the training labels (20%, 50%, 80%) is replaced by uniformly
random labels (Zhang et al. 2017; a new label may equal the old one), the
test labels are kept. Reported, as in the paper: the best test error during
training and the last one, and the training error at the end on the examples
whose labels were kept ("real") and on the replaced ones, measured against
the corrupted labels ("corrupted": low means memorised). Methods and
hyper-parameters are the paper's best per corruption level: dropout p = 0.7
(20%) / 0.8 (50%, 80%), mixup alpha = 8 (20%) / 32 (50%, 80%), and mixup +
dropout (alpha = 8, p = 0.3). Model: the zoo's `mlp` (with `dropout`) on
scikit-learn's digits (the paper: PreAct ResNet-18 on CIFAR-10), SGD with
momentum, learning rate / 10 at 50% and 75% of training, weight decay 1e-4.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import optax

from mixjax import methods
from mixjax import models
from mixjax.experiments import common
from mixjax.experiments import data
from mixjax.experiments import training

NAME = "corrupted_labels"
# Corruption level -> [(label, dropout, alpha or None)], the paper's Table 2 settings.
SETTINGS = {
    0.2: [("ERM", 0.0, None), ("ERM + dropout (p = 0.7)", 0.7, None),
          ("mixup (alpha = 8)", 0.0, 8.0), ("mixup + dropout (alpha = 8, p = 0.3)", 0.3, 8.0)],
    0.5: [("ERM", 0.0, None), ("ERM + dropout (p = 0.8)", 0.8, None),
          ("mixup (alpha = 32)", 0.0, 32.0), ("mixup + dropout (alpha = 8, p = 0.3)", 0.3, 8.0)],
    0.8: [("ERM", 0.0, None), ("ERM + dropout (p = 0.8)", 0.8, None),
          ("mixup (alpha = 32)", 0.0, 32.0), ("mixup + dropout (alpha = 8, p = 0.3)", 0.3, 8.0)],
}
PUBLISHED = {  # CIFAR-10, PreAct ResNet-18: best, last, train real, train corrupted (%).
    (0.2, "ERM"): (12.7, 16.6, 0.05, 0.28), (0.2, "dropout"): (8.8, 10.4, 5.26, 83.55),
    (0.2, "mixup"): (5.9, 6.4, 2.27, 86.32),
    (0.5, "ERM"): (18.8, 44.6, 0.26, 0.64), (0.5, "dropout"): (14.1, 15.5, 12.71, 86.98),
    (0.5, "mixup"): (11.3, 12.7, 5.84, 85.71),
    (0.8, "ERM"): (36.5, 73.9, 0.62, 0.83), (0.8, "dropout"): (30.9, 35.1, 29.84, 86.37),
    (0.8, "mixup"): (25.3, 30.9, 18.92, 85.44),
    (0.8, "mixup + dropout"): (24.0, 24.8, 19.70, 87.67),
}


def corrupt_labels(labels: np.ndarray, fraction: float, num_classes: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Replaces the labels of `round(fraction * N)` random examples by uniform random labels.

  The same draw as `mixjax.input_pipeline.corrupt_labels` (so `train.py` runs
  with `dataset.label_corruption` and `dataset.corruption_seed` corrupt the
  same examples). A replaced label may by chance equal the true one.

  Args:
    labels: int[N] true labels; fraction: in [0, 1]; num_classes: C; seed: int.
  Returns:
    (new labels int32[N], mask bool[N]: True where the label was replaced).
  """
  labels = np.array(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be int class ids of shape (N,), got {labels.dtype}"
                     f"{labels.shape}.")
  if not 0.0 <= float(fraction) <= 1.0:
    raise ValueError(f"fraction must be in [0, 1], got {fraction!r}.")
  if int(num_classes) != num_classes or num_classes < 2:
    raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
  labels = labels.astype(np.int32)
  rng = np.random.default_rng([seed, 11])
  idx = rng.choice(len(labels), int(round(fraction * len(labels))), replace=False)
  labels[idx] = rng.integers(0, num_classes, len(idx))
  mask = np.zeros(len(labels), bool)
  mask[idx] = True
  return labels, mask


def optimizer(lr: float, steps: int) -> optax.GradientTransformation:
  """SGD (momentum 0.9, weight decay 1e-4), lr / 10 at 50% and at 75% of `steps`."""
  schedule = optax.piecewise_constant_schedule(lr, {int(0.5 * steps): 0.1,
                                                    int(0.75 * steps): 0.1})
  return optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(schedule, momentum=0.9))


def run_one(x, y_true, y_train, mask, xte, yte, *, dropout: float, alpha: Optional[float],
            hidden: Sequence[int], epochs: int, batch_size: int,
            tx: optax.GradientTransformation, seed: int, fast: bool = False) -> dict:
  """Trains one method; returns test errors per epoch and final training errors."""
  model = models.get_model("mlp", num_classes=10, hidden_sizes=tuple(hidden), dropout=dropout)
  obj = (methods.get_objective("erm", num_classes=10) if alpha is None else
         methods.get_objective("mixup", num_classes=10, alpha=alpha))
  fit = training.fit(model, obj, x, y_train, tx=tx, epochs=epochs, batch_size=batch_size,
                     seed=seed, test=(xte, yte), fast=fast)
  pred = np.argmax(training.predict(model, fit.variables, x, fast=fast), -1)
  test = np.array([h["test_error"] for h in fit.history])
  return {"test": test, "best": float(test.min()), "last": float(test[-1]),
          "train_real": float(np.mean(pred[~mask] != y_true[~mask])) if (~mask).any() else 0.0,
          "train_corrupted": float(np.mean(pred[mask] != y_train[mask])) if mask.any() else 0.0}


def _published(level: float, label: str) -> str:
  kind = ("mixup + dropout" if label.startswith("mixup +") else "mixup" if label.startswith(
      "mixup") else "dropout" if "dropout" in label else "ERM")
  vals = PUBLISHED.get((level, kind))
  return " / ".join(f"{v:g}" for v in vals) if vals else "–"


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = common.make_parser(NAME, __doc__)
  parser.add_argument("--levels", type=common.csv_floats, default=None,
                      help="corruption fractions (default 0.2,0.5,0.8; --quick: 0.5)")
  parser.add_argument("--epochs", type=int, default=None, help="default 200 (--quick: 4)")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--lr", type=float, default=0.1)
  args = parser.parse_args(argv)
  levels = args.levels or ([0.5] if args.quick else [0.2, 0.5, 0.8])
  for level in levels:
    if level not in SETTINGS:
      parser.error(f"level {level} has no paper settings; choose from {sorted(SETTINGS)}")
  epochs = args.epochs or (4 if args.quick else 200)
  hidden = (64, 64) if args.quick else (512, 512)

  x, y = data.digits_images()
  x = x.reshape(len(x), -1)
  tr, te = data.split(y, 0.2, args.seed)
  tx = optimizer(args.lr, epochs * (len(tr) // args.batch_size))
  results, rows = {}, []
  for level in levels:
    y_train, mask = corrupt_labels(y[tr], level, 10, args.seed)
    for label, dropout, alpha in SETTINGS[level]:
      r = run_one(x[tr], y[tr], y_train, mask, x[te], y[te], dropout=dropout, alpha=alpha,
                  hidden=hidden, epochs=epochs, batch_size=args.batch_size, tx=tx,
                  seed=args.seed, fast=args.quick)
      results[level, label] = r
      rows.append([f"{100 * level:g}%", label, common.pct(r["best"], 1), common.pct(r["last"], 1),
                   common.pct(r["train_real"]), common.pct(r["train_corrupted"]),
                   _published(level, label)])
  table = common.markdown_table(
      ["Label corruption", "Method", "Test error: best", "Test error: last",
       "Training error: real", "Training error: corrupted",
       "Published (CIFAR-10): best / last / real / corrupted"], rows)
  notes = (f"scikit-learn digits ({len(tr)} train / {len(te)} test), MLP "
           f"{'x'.join(map(str, hidden))}, {epochs} epochs, batch {args.batch_size}, SGD lr "
           f"{args.lr} (momentum 0.9, /10 at 50% and 75%), weight decay 1e-4. Errors in %.")

  plt = common.pyplot()
  fig, axes = plt.subplots(1, len(levels), figsize=(4.6 * len(levels), 3.4), squeeze=False)
  for ax, level in zip(axes[0], levels):
    for label, _, _ in SETTINGS[level]:
      test = results[level, label]["test"]
      ax.plot(np.arange(1, len(test) + 1), 100 * test, label=label)
    ax.set_title(f"{100 * level:g}% corrupted labels")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test error (%)")
    ax.legend(fontsize=7)
  figures = [common.save_figure(fig, args.out, "corrupted_labels_test_error.png")]
  report = common.write_report(args.out, NAME, "Memorisation of corrupted labels",
                               [table, notes, "![test error](corrupted_labels_test_error.png)"])
  return {"results": results, "report": report, "figures": figures}


if __name__ == "__main__":
  main()
