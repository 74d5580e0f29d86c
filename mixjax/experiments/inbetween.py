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
  args = parser.parse_args(argv)
  quick = args.quick
  epochs = args.epochs or (3 if quick else 30)
  num_pairs = args.pairs or (200 if quick else 2000)

  x, y = data.digits_images()
  tr, te = data.split(y, 0.2, args.seed)
  model = models.get_model("preact_resnet_small", num_classes=10, width=32, conv=not quick)
  tx = optax.adam(2e-3)
  objs = {"ERM": methods.get_objective("erm", num_classes=10),
          "mixup": methods.get_objective("mixup", num_classes=10, alpha=args.alpha)}
  rng = np.random.default_rng(args.seed)
  pairs = rng.integers(0, len(tr), size=(num_pairs, 2))
  lams = np.linspace(0.0, 1.0, 11 if quick else 21)
  stats, clean = {}, {}
  for name, obj in objs.items():
    fit = training.fit(model, obj, x[tr], y[tr], tx=tx, epochs=epochs, batch_size=64,
                       seed=args.seed, test=(x[te], y[te]), fast=quick)
    fn = training.predictor(model, fit.variables)
    stats[name] = inbetween_stats(fn, x[tr], y[tr], pairs, lams, 10, fast=quick)
    clean[name] = fit.history[-1]["test_error"]

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
  rows = []
  for name, (miss, norm) in stats.items():
    at = lambda v, l: v[int(np.argmin(np.abs(lams - l)))]  # noqa: E731
    rows.append([name, common.pct(clean[name], 1), common.pct(miss[inner].mean(), 1),
                 common.pct(at(miss, 0.5), 1), f"{norm[inner].mean():.3f}",
                 f"{at(norm, 0.5):.3f}"])
  table = common.markdown_table(
      ["Model", "Test error (%)", "Misses, mean over 0 < lam < 1 (%)", "Misses at lam = 0.5 (%)",
       "Grad norm, mean over 0 < lam < 1", "Grad norm at lam = 0.5"], rows)
  notes = (f"{num_pairs} random pairs of training examples, lam on a grid of {len(lams)} "
           f"points; {'dense' if quick else 'convolutional'} ResNet, Adam 2e-3, {epochs} "
           f"epochs, batch 64; mixup alpha = {args.alpha}.")
  report = common.write_report(args.out, NAME, "Behaviour in-between training examples",
                               [table, notes, "![in-between](inbetween.png)"])
  return {"stats": stats, "lams": lams, "clean": clean, "report": report, "figures": figures}


if __name__ == "__main__":
  main()
