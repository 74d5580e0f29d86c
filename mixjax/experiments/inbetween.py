"""Model behaviour in-between training examples, ERM vs mixup (mixup paper, Figure 2).

Two models of the same architecture and training recipe, one trained with ERM
and one with mixup, are evaluated at `x = lam x_i + (1 - lam) x_j` for random
pairs of training examples (i, j) and lam on a grid of [0, 1]:
(a) prediction misses: the predicted class is neither y_i nor y_j;
(b) the norm of the gradient, with respect to the input, of the
    cross-entropy against the mixed target `lam y_i + (1 - lam) y_j`.
Model: the zoo's small pre-activation ResNet (`preact_resnet_small`) on
scikit-learn's 8x8 digits (the paper: CIFAR-10).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixjax import losses
from mixjax import methods
from mixjax import models
from mixjax.experiments import common
from mixjax.experiments import data
from mixjax.experiments import training

NAME = "inbetween"


def inbetween_stats(apply_fn: Callable[[jax.Array], jax.Array], x: np.ndarray, y: np.ndarray,
                    pairs: np.ndarray, lams: np.ndarray, num_classes: int,
                    batch_size: int = 512, fast: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Miss rate and mean input-gradient norm at `lam x_i + (1-lam) x_j`.

  Args:
    apply_fn: batched eval-mode model `x -> logits f[B, C]`.
    x: inputs f[N, ...]; y: int labels [N]; pairs: int[P, 2] (i, j); lams: f[L].
    fast: compile with XLA's backend optimisations off (`common.jit`).
  Returns:
    (misses f64[L]: fraction of pairs whose prediction is not in {y_i, y_j},
     grad_norm f64[L]: mean over pairs of |d/dx xent(f(x), lam y_i + (1-lam) y_j)|_2).
  """
  def per_lam(xi, xj, yi, yj, lam):
    mixed = lam * xi + (1 - lam) * xj
    targets = (lam * jax.nn.one_hot(yi, num_classes)
               + (1 - lam) * jax.nn.one_hot(yj, num_classes))
    total = lambda v: jnp.sum(losses.softmax_cross_entropy(apply_fn(v), targets))  # noqa: E731
    grads = jax.grad(total)(mixed)
    pred = jnp.argmax(apply_fn(mixed), -1)
    miss = (pred != yi) & (pred != yj)
    norm = jnp.sqrt(jnp.sum(jnp.square(grads).reshape(grads.shape[0], -1), -1))
    return jnp.sum(miss), jnp.sum(norm)

  fn = common.jit(per_lam, fast=fast)
  misses, norms = np.zeros(len(lams)), np.zeros(len(lams))
  for start in range(0, len(pairs), batch_size):
    p = pairs[start:start + batch_size]
    xi, xj, yi, yj = map(jnp.asarray, (x[p[:, 0]], x[p[:, 1]], y[p[:, 0]], y[p[:, 1]]))
    for k, lam in enumerate(lams):
      m, g = fn(xi, xj, yi, yj, jnp.float32(lam))
      misses[k] += float(m)
      norms[k] += float(g)
  return misses / len(pairs), norms / len(pairs)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = common.make_parser(NAME, __doc__)
  parser.add_argument("--alpha", type=float, default=1.0, help="mixup Beta(alpha, alpha)")
  parser.add_argument("--epochs", type=int, default=None, help="default 30 (--quick: 3)")
  parser.add_argument("--pairs", type=int, default=None, help="default 2000 (--quick: 200)")
  parser.add_argument("--seeds", type=int, default=None,
                      help="default 1; each seed (seed, seed + 1, ...) draws its own split, "
                           "pairs and initialisation; cells are mean ± std over seeds")
  args = parser.parse_args(argv)
  quick = args.quick
  epochs = args.epochs or (3 if quick else 30)
  num_pairs = args.pairs or (200 if quick else 2000)
  if args.seeds is not None and args.seeds < 1:
    parser.error(f"--seeds must be at least 1, got {args.seeds}")
  seeds = [args.seed + i for i in range(args.seeds or 1)]

  x, y = data.digits_images()
  model = models.get_model("preact_resnet_small", num_classes=10, width=32, conv=not quick)
  tx = optax.adam(2e-3)
  objs = {"ERM": methods.get_objective("erm", num_classes=10),
          "mixup": methods.get_objective("mixup", num_classes=10, alpha=args.alpha)}
  lams = np.linspace(0.0, 1.0, 11 if quick else 21)
  per_seed = {name: [] for name in objs}       # [(misses f64[L], norms f64[L], clean error)]
  for seed in seeds:
    tr, te = data.split(y, 0.2, seed)
    rng = np.random.default_rng(seed)
    pairs = rng.integers(0, len(tr), size=(num_pairs, 2))
    for name, obj in objs.items():
      fit = training.fit(model, obj, x[tr], y[tr], tx=tx, epochs=epochs, batch_size=64,
                         seed=seed, test=(x[te], y[te]), fast=quick)
      fn = training.predictor(model, fit.variables)
      miss, norm = inbetween_stats(fn, x[tr], y[tr], pairs, lams, 10, fast=quick)
      per_seed[name].append((miss, norm, fit.history[-1]["test_error"]))
      print(f"[{name}, seed {seed}: done]", flush=True)
  # The mean curves over seeds, and the mean clean test error.
  stats = {n: (np.mean([r[0] for r in rs], 0), np.mean([r[1] for r in rs], 0))
           for n, rs in per_seed.items()}
  clean = {n: float(np.mean([r[2] for r in rs])) for n, rs in per_seed.items()}

  plt = common.pyplot()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
  for name, (miss, norm) in stats.items():
    ax1.plot(lams, 100 * miss, "o-", label=name)
    ax2.plot(lams, norm, "o-", label=name)
  ax1.set_xlabel("lam")
  ax1.set_ylabel("% misses (prediction not in {y_i, y_j})")
  ax2.set_xlabel("lam")
  ax2.set_ylabel("|grad_x loss|")
  ax1.legend()
  ax2.legend()
  figures = [common.save_figure(fig, args.out, "inbetween.png")]

  inner = (lams > 0.05) & (lams < 0.95)
  half = int(np.argmin(np.abs(lams - 0.5)))
  rows = []
  for name, rs in per_seed.items():
    rows.append([name, common.mean_std([r[2] for r in rs], 1),
                 common.mean_std([r[0][inner].mean() for r in rs], 1),
                 common.mean_std([r[0][half] for r in rs], 1),
                 common.mean_std([r[1][inner].mean() for r in rs], 3, scale=1.0),
                 common.mean_std([r[1][half] for r in rs], 3, scale=1.0)])
  table = common.markdown_table(
      ["Model", "Test error (%)", "Misses, mean over 0 < lam < 1 (%)", "Misses at lam = 0.5 (%)",
       "Grad norm, mean over 0 < lam < 1", "Grad norm at lam = 0.5"], rows)
  notes = (f"Mean ± std (population) over {len(seeds)} seed(s) ({seeds[0]}..{seeds[-1]}), each "
           f"its own split, pairs and initialisation (figure: the mean curves); {num_pairs} "
           f"random pairs of training examples, lam on a grid of {len(lams)} "
           f"points; {'dense' if quick else 'convolutional'} ResNet, Adam 2e-3, {epochs} "
           f"epochs, batch 64; mixup alpha = {args.alpha}.")
  report = common.write_report(args.out, NAME, "Behaviour in-between training examples",
                               [table, notes, "![in-between](inbetween.png)"])
  return {"stats": stats, "per_seed": per_seed, "seeds": seeds, "lams": lams, "clean": clean,
          "report": report, "figures": figures}


if __name__ == "__main__":
  main()
