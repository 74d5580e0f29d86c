"""The mixup paper's ablation study (Table 5) as configurations of one runner.

Every row trains the same model with the same recipe, and changes only how
training examples are formed:
- ERM; mixup of random pairs from all classes (AC + RP, the default) or with
  one of the k nearest neighbours of each example (AC + KNN, k = 200);
- mixing labels and latent representations at Layer 1..5, i.e. before
  residual block 1..4 or before the classifier (the `point` of
  `objectives.mixup`: the model's mixing points 'stem', 'stage1'..'stage4',
  AC + RP);
- mixing inputs only, with the label of the closer example (weight >= 1/2),
  pairs from the same class (SC) or all classes (AC), random (RP) or k
  nearest neighbours (KNN; SC + KNN is SMOTE);
- label smoothing (eps/C on wrong classes, as in the paper), mixing inputs +
  label smoothing, and Gaussian input noise.
Each at two weight decays (1e-4, 5e-4). Reported: the median test error of the
last 10 epochs, mean ± std over seeds (each seed draws its own train/test split
and initialisation). Data: scikit-learn's 8x8 digits (the paper: CIFAR-10 with
PreAct ResNet-18); model: the zoo's small pre-activation ResNet
(`preact_resnet_small`) with dense residual blocks (XLA's CPU convolutions
would make the 44 runs take hours); SGD with momentum and cosine decay;
lam ~ Beta(1, 1).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mixjax import mixupe
from mixjax import models
from mixjax import objectives
from mixjax import pairing
from mixjax import policies
from mixjax.experiments import common
from mixjax.experiments import data
from mixjax.experiments import training

NAME = "ablations"
NUM_CLASSES = 10
# Layer k of the paper's table -> the mixing point of `preact_resnet_small` whose output
# enters residual block k (k = 1..4), or the classifier (k = 5).
MIX_POINTS = {1: "stem", 2: "stage1", 3: "stage2", 4: "stage3", 5: "stage4"}


@dataclasses.dataclass(frozen=True)
class Config:
  """One row of Table 5."""
  id: str
  method: str
  spec: str
  input_modified: bool
  target_modified: bool
  kind: str                           # erm | mixup | knn | noise | erm_mixupe | mixupe
  point: Optional[str] = None         # hidden mixing point (Layer k)
  pairs: str = "random"               # random | same_class (in-batch) ; knn: 'all' | 'same'
  closer_label: bool = False          # mix inputs only: target of the closer example
  label_smoothing: float = 0.0
  sigma: float = 0.0


def configs() -> list[Config]:
  """All rows, in the paper's order."""
  out = [Config("erm", "ERM", "", False, False, "erm"),
         Config("mixup_ac_rp", "mixup", "AC + RP", True, True, "mixup"),
         Config("mixup_ac_knn", "mixup", "AC + KNN", True, True, "knn", pairs="all")]
  for k, point in MIX_POINTS.items():
    out.append(Config(f"layer{k}", "mix labels and latent representations (AC + RP)",
                      f"Layer {k}", True, True, "mixup", point=point))
  for spec, kind, pairs in (("SC + KNN", "knn", "same"), ("AC + KNN", "knn", "all"),
                            ("SC + RP", "mixup", "same_class"), ("AC + RP", "mixup", "random")):
    out.append(Config(f"inputs_{spec.lower().replace(' + ', '_')}", "mix inputs only", spec,
                      True, False, kind, pairs=pairs, closer_label=True))
  for eps in (0.05, 0.1, 0.2):
    out.append(Config(f"ls_{eps:g}", "label smoothing", f"eps = {eps:g}", False, True, "erm",
                      label_smoothing=eps))
  for eps in (0.05, 0.1, 0.2, 0.4):
    out.append(Config(f"mixls_{eps:g}", "mix inputs + label smoothing (AC + RP)",
                      f"eps = {eps:g}", True, True, "mixup", label_smoothing=eps))
  for sigma in (0.05, 0.1, 0.2):
    out.append(Config(f"noise_{sigma:g}", "add Gaussian noise to inputs", f"sigma = {sigma:g}",
                      True, False, "noise", sigma=sigma))
  # Not in Table 5: the MixupE paper's Table 7 rows (its term on ERM and on mixup, eta 1e-3).
  out.append(Config("erm_mixupe", "ERM + MixupE's term (MixupE, Table 7)", "eta = 1e-3",
                    False, False, "erm_mixupe"))
  out.append(Config("mixupe", "MixupE: mixup + its term (MixupE, Table 7)", "AC + RP, eta = 1e-3",
                    True, True, "mixupe"))
  return out


QUICK = ("erm", "mixup_ac_rp", "mixup_ac_knn", "layer3", "inputs_sc_rp", "ls_0.1", "noise_0.1")
PUBLISHED = {  # CIFAR-10, PreAct ResNet-18, weight decay 1e-4 / 5e-4 (%).
    "erm": (5.53, 5.18), "mixup_ac_rp": (4.24, 4.68), "mixup_ac_knn": (4.98, 5.26),
    "layer1": (4.44, 4.51), "layer2": (4.56, 4.61), "layer3": (5.39, 5.55),
    "layer4": (5.95, 5.43), "layer5": (5.39, 5.15), "inputs_sc_knn": (5.45, 5.52),
    "inputs_ac_knn": (5.43, 5.48), "inputs_sc_rp": (5.23, 5.55), "inputs_ac_rp": (5.17, 5.72),
    "ls_0.05": (5.25, 5.02), "ls_0.1": (5.33, 5.17), "ls_0.2": (5.34, 5.06),
    "mixls_0.05": (5.02, 5.40), "mixls_0.1": (5.08, 5.09), "mixls_0.2": (4.98, 5.06),
    "mixls_0.4": (5.25, 5.39), "noise_0.05": (5.53, 5.04), "noise_0.1": (6.41, 5.86),
    "noise_0.2": (7.16, 7.24),
}


def nearest_neighbours(x: np.ndarray, y: np.ndarray, k: int, same_class: bool) -> np.ndarray:
  """int32[N, k]: the k nearest other examples of each (Euclidean, flattened inputs).

  same_class: only among examples of the same class (k is capped by the
  smallest class size - 1).
  """
  flat = x.reshape(len(x), -1).astype(np.float64)
  sq = np.sum(flat ** 2, -1)
  dist = sq[:, None] + sq[None, :] - 2 * flat @ flat.T
  np.fill_diagonal(dist, np.inf)
  if same_class:
    dist[y[:, None] != y[None, :]] = np.inf
    k = min(k, int(np.bincount(y).min()) - 1)
  k = min(k, len(x) - 1)
  if k < 1:
    raise ValueError("need at least 2 examples (per class, for same_class) for neighbours.")
  return np.argsort(dist, axis=-1, kind="stable")[:, :k].astype(np.int32)


def closer_label(lam: jax.Array) -> jax.Array:
  """Label weight of the example itself when only inputs are mixed: 1 if lam >= 1/2."""
  return (lam >= 0.5).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class NoisyErm:
  """ERM on inputs plus N(0, sigma^2) noise (an objective, like `objectives.erm`)."""
  sigma: float
  erm: objectives.Erm = objectives.erm(num_classes=NUM_CLASSES)

  def __call__(self, apply, variables, inputs, labels, key):
    k_noise, k_drop = jax.random.split(key)
    noisy = inputs + self.sigma * jax.random.normal(k_noise, inputs.shape, inputs.dtype)
    return self.erm(apply, variables, noisy, labels, k_drop)


def knn_pairs(data: tuple, idx: jax.Array, key: jax.Array):
  """`training.fit`'s fetch for the KNN rows: each example and a random one of its neighbours.

  data = (X, Y, neighbours int32[N, k]); returns ((X[idx], X[partner]), (Y[idx], Y[partner])).
  """
  x, y, table = data
  partner = table[idx, jax.random.randint(key, idx.shape, 0, table.shape[1])]
  return (x[idx], x[partner]), (y[idx], y[partner])


def build(cfg: Config, policy: policies.Policy):
  """(objective, fetch) of a row for `training.fit` (fetch: `take_rows`, or `knn_pairs` with
  the neighbour table as extra data); `policy` draws the mixing coefficients (the paper's:
  `policies.mixup(alpha)`), its label weight replaced by `closer_label` where the row says."""
  if cfg.kind == "erm":
    return objectives.erm(num_classes=NUM_CLASSES,
                          label_smoothing=cfg.label_smoothing), training.take_rows
  if cfg.kind == "noise":
    return NoisyErm(cfg.sigma), training.take_rows
  if cfg.kind == "erm_mixupe":  # E[1 - lam] of the run's Beta(alpha, alpha) weighs the term.
    return mixupe.mixupe(objectives.erm(num_classes=NUM_CLASSES), alpha=policy.alpha,
                         beta=policy.beta), training.take_rows
  if cfg.kind == "mixupe":
    return mixupe.mixupe(objectives.mixup(policy, num_classes=NUM_CLASSES)), training.take_rows
  if cfg.closer_label:
    policy = policies.weighted(policy, closer_label)
  if cfg.kind == "mixup":
    return objectives.mixup(policy, pairing.get_pairing(cfg.pairs), num_classes=NUM_CLASSES,
                            point=cfg.point,
                            label_smoothing=cfg.label_smoothing), training.take_rows
  return training.PartnerMixup(policy, num_classes=NUM_CLASSES,
                               label_smoothing=cfg.label_smoothing), knn_pairs


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = common.make_parser(NAME, __doc__)
  all_ids = [c.id for c in configs()]
  parser.add_argument("--configs", type=common.csv_names, default=None,
                      help=f"rows to run (default: all; --quick: {','.join(QUICK)}); "
                           f"ids: {', '.join(all_ids)}")
  parser.add_argument("--weight_decays", type=common.csv_floats, default=None,
                      help="default 1e-4,5e-4 (--quick: 1e-4)")
  parser.add_argument("--epochs", type=int, default=None, help="default 60 (--quick: 3)")
  parser.add_argument("--seeds", type=int, default=None, help="default 3 (--quick: 1)")
  parser.add_argument("--width", type=int, default=None, help="default 128 (--quick: 16)")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--lr", type=float, default=0.05)
  parser.add_argument("--alpha", type=float, default=1.0)
  parser.add_argument("--k", type=int, default=200, help="nearest neighbours (KNN rows)")
  args = parser.parse_args(argv)
  ids = args.configs or (list(QUICK) if args.quick else all_ids)
  unknown = [i for i in ids if i not in all_ids]
  if unknown:
    parser.error(f"unknown configs {unknown}; choose from {all_ids}")
  rows_cfg = [c for c in configs() if c.id in ids]
  wds = args.weight_decays or ([1e-4] if args.quick else [1e-4, 5e-4])
  epochs = args.epochs or (3 if args.quick else 60)
  last = min(10, epochs)

  seeds = [args.seed + i for i in range(args.seeds or (1 if args.quick else 3))]
  width = args.width or (16 if args.quick else 128)

  x, y = data.digits_images()
  model = models.get_model("preact_resnet_small", num_classes=NUM_CLASSES, width=width,
                           conv=False)
  kinds = {c.pairs for c in rows_cfg if c.kind == "knn"}
  # Objectives and optimizers are built once, so every seed of a row reuses its compilation.
  policy = policies.mixup(args.alpha)
  built = {c.id: build(c, policy) for c in rows_cfg}
  splits = {seed: data.split(y, 0.2, seed) for seed in seeds}
  total_steps = epochs * (len(splits[seeds[0]][0]) // args.batch_size)
  txs = {wd: training.sgd(args.lr, weight_decay=wd, total_steps=total_steps) for wd in wds}
  results = {}
  for seed in seeds:
    tr, te = splits[seed]
    neighbours = {p: nearest_neighbours(x[tr], y[tr], args.k, p == "same") for p in kinds}
    for c in rows_cfg:
      objective, fetch = built[c.id]
      extra = (neighbours[c.pairs],) if c.kind == "knn" else ()
      for wd in wds:
        fit = training.fit(model, objective, x[tr], y[tr], tx=txs[wd], epochs=epochs,
                           batch_size=args.batch_size, seed=seed, test=(x[te], y[te]),
                           fetch=fetch, extra=extra, fast=args.quick)
        errors = np.array([h["test_error"] for h in fit.history])
        results.setdefault((c.id, wd), []).append(
            {"errors": errors, "median_last": float(np.median(errors[-last:]))})
  medians = {k: [r["median_last"] for r in v] for k, v in results.items()}

  tick = lambda b: "✓" if b else "✗"  # noqa: E731
  rows = []
  for c in rows_cfg:
    pub = PUBLISHED.get(c.id)
    rows.append([c.method, c.spec, tick(c.input_modified), tick(c.target_modified)]
                + [common.mean_std(medians[c.id, wd]) for wd in wds]
                + [f"{pub[0]:.2f} / {pub[1]:.2f}" if pub else "– (not in Table 5)"])
  table = common.markdown_table(
      ["Method", "Specification", "Input modified", "Target modified"]
      + [f"weight decay {wd:g}" for wd in wds] + ["Published (CIFAR-10) 1e-4 / 5e-4"], rows)
  notes = (f"Median test error (%) of the last {last} epochs, mean ± std over {len(seeds)} "
           f"seed(s); digits {len(tr)} train / {len(te)} test; pre-activation ResNet with dense "
           f"residual blocks of width {width}, SGD momentum 0.9, lr {args.lr} cosine, "
           f"{epochs} epochs, batch {args.batch_size}; "
           f"lam ~ Beta({args.alpha}, {args.alpha}); KNN: k = {args.k} (same class: capped by "
           "the class size).")

  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(7, 0.28 * len(rows_cfg) * len(wds) + 1.2))
  labels, vals, errs = [], [], []
  for c in rows_cfg:
    for wd in wds:
      labels.append(f"{c.method.split(' (')[0]}: {c.spec} (wd {wd:g})".replace(": (", " ("))
      vals.append(100 * np.mean(medians[c.id, wd]))
      errs.append(100 * np.std(medians[c.id, wd]))
  ax.barh(np.arange(len(vals)), vals, xerr=errs)
  ax.set_yticks(np.arange(len(vals)), labels, fontsize=7)
  ax.invert_yaxis()
  ax.set_xlabel("median test error, last epochs (%)")
  figures = [common.save_figure(fig, args.out, "ablations.png")]
  report = common.write_report(args.out, NAME, "Ablation study (mixup paper, Table 5)",
                               [table, notes, "![ablations](ablations.png)"])
  return {"results": results, "medians": medians, "seeds": seeds, "configs": rows_cfg,
          "report": report, "figures": figures}


if __name__ == "__main__":
  main()
