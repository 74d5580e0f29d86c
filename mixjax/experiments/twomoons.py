"""The mixup loss and its quadratic approximation along training (Zhang et al. 2021, Fig. 2).

Logistic regression (f = x^T theta, no bias: the setting of Theorem 3.1) and a
2-layer ReLU net (the zoo's `mlp` with one hidden layer and one logit) are
trained on scikit-learn's two moons (standardised), from the same
initialisation, once on the mixup loss of Eq. (1) and once on its quadratic
approximation L~_mix = L_std + R1 + R2 + R3 (Lemma 3.1), by
`mixjax.train_step.train_step` with full-batch Adam. Both are deterministic:
the mixup loss sums all n^2 pairs with Gauss-Jacobi quadrature over lam
(`theory.mixup_loss_exact`), the approximation uses nested JVPs
(`theory.quadratic_terms`). As in the paper,
each model's train and test losses are computed with its own loss; the
largest relative gap between the two curves is printed. Also reported: both
losses at the same parameters (the mixup-trained ones), the second-order
approximation of the l2 adversarial loss (Lemma 3.2 / Eq. (6)) against an
iterative l2 attack (App. C.2, radius eps*sqrt(d) = 0.5), and Theorem 3.1's
R = min_i |cos(theta, x_i)| along training for logistic regression (Fig. 3).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixjax import attacks
from mixjax import models
from mixjax import adapters
from mixjax import objectives
from mixjax import theory
from mixjax import train_step as train_step_lib
from mixjax.experiments import common
from mixjax.experiments import data

NAME = "twomoons"


def two_moons(n: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's two moons: x f32[n, 2], y f32[n] in {0, 1}."""
  from sklearn.datasets import make_moons
  x, y = make_moons(n, noise=noise, random_state=seed)
  return x.astype(np.float32), y.astype(np.float32)


def logistic_model(key: jax.Array, d: int = 2):
  """f(x) = x^T w (one logit). Returns (apply(params, x) -> f[B], params)."""
  return (lambda p, x: x @ p["w"]), {"w": 0.1 * jax.random.normal(key, (d,))}


def relu_net(key: jax.Array, hidden: int, d: int = 2):
  """f(x) = w2^T relu(W1 x + b1) + b2 (one logit): the zoo's `mlp` with one hidden layer of
  `hidden` units and one output. Returns (apply(params, x) -> f[B], params)."""
  model = models.get_model("mlp", num_classes=1, hidden_sizes=(hidden,))
  params = train_step_lib.init_variables(model, key, jnp.zeros((1, d)))["params"]
  return (lambda p, x: model.apply({"params": p}, x)[:, 0]), params


def loss_objective(loss: Callable) -> objectives.Objective:
  """An objective (for `train_step`) of a full-batch loss `loss(fn, x, y) -> f32[]` of the
  model `fn: x -> f[B]` (one logit per example)."""
  def objective(apply, variables, inputs, labels, key):
    del key
    value = loss(lambda v: apply(variables, v)[0], inputs, labels)
    return value, ({}, {"loss": value})
  return objective


def adversarial_loss(fn: Callable, x: np.ndarray, y: np.ndarray, radius: float,
                     steps: int = 20) -> float:
  """Logistic loss under an iterative l2 attack of radius `radius` (mixjax.attacks)."""
  logits = lambda v: jnp.stack([jnp.zeros(v.shape[0]), fn(v)], axis=-1)  # noqa: E731
  x_adv = attacks.ifgsm(logits, jnp.asarray(x), jnp.asarray(y.astype(np.int32)), radius,
                        steps=steps, step_size=2.5 * radius / steps, norm="l2",
                        clip_min=None, clip_max=None)
  return float(theory.standard_loss(fn, "logistic", x_adv, y))


def train_pair(apply, params0, data, *, alpha: float, beta: Optional[float], steps: int,
               lr: float, eval_every: int, num_nodes: int, logistic: bool,
               fast: bool = False) -> dict:
  """Trains from params0 on the mixup loss (A) and on its approximation (B)."""
  xtr, ytr, xte, yte = data

  def mix_loss(f, x, y):
    return theory.mixup_loss_exact(f, "logistic", x, y, alpha, beta, num_nodes=num_nodes)

  def approx_loss(f, x, y):
    return theory.approximate_mixup_loss(f, "logistic", x, y, alpha, beta)

  def mix(p, x, y):
    return mix_loss(lambda v: apply(p, v), x, y)

  def approx(p, x, y):
    return approx_loss(lambda v: apply(p, v), x, y)

  tx = optax.adam(lr)
  batch = {"inputs": jnp.asarray(xtr), "labels": jnp.asarray(ytr)}
  step_kw = dict(apply=adapters.make_apply_fn(apply), tx=tx)

  @functools.partial(common.jit, fast=fast)
  def step(sa, sb):  # A descends the mixup loss, B its approximation.
    sa, _ = train_step_lib.train_step(sa, batch, objective=loss_objective(mix_loss), **step_kw)
    sb, _ = train_step_lib.train_step(sb, batch, objective=loss_objective(approx_loss),
                                      **step_kw)
    return sa, sb

  @functools.partial(common.jit, fast=fast)
  def evaluate(pa, pb):
    out = {}
    for split, (x, y) in (("train", (xtr, ytr)), ("test", (xte, yte))):
      out[f"mix_{split}"] = mix(pa, x, y)
      out[f"approx_{split}"] = approx(pb, x, y)
      out[f"approx_at_a_{split}"] = approx(pa, x, y)
    if logistic:
      out["cos_min"] = theory.mixup_radius(pa["w"], xtr, alpha, beta).cos_min
    return out

  sa = sb = train_step_lib.create_train_state({"params": params0}, tx, jax.random.key(0),
                                             ema=False)
  rec = {k: [] for k in ("step", "mix_train", "mix_test", "approx_train", "approx_test",
                         "approx_at_a_train", "approx_at_a_test", "cos_min")}
  for t in range(steps + 1):
    if t % eval_every == 0 or t == steps:
      rec["step"].append(t)
      for k, v in evaluate(sa.params, sb.params).items():
        rec[k].append(float(v))
    if t < steps:
      sa, sb = step(sa, sb)
  rec = {k: np.asarray(v) for k, v in rec.items()}
  rec["params_a"], rec["params_b"] = sa.params, sb.params
  return rec


def max_rel_gap(a: np.ndarray, b: np.ndarray) -> float:
  """max_t |a_t - b_t| / |a_t|."""
  return float(np.max(np.abs(a - b) / np.abs(a)))


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = common.make_parser(NAME, __doc__)
  parser.add_argument("--alpha", type=float, default=1.0, help="lam ~ Beta(alpha, beta)")
  parser.add_argument("--beta", type=float, default=None, help="default: alpha")
  parser.add_argument("--n", type=int, default=None, help="train (= test) size; default 200")
  parser.add_argument("--noise", type=float, default=0.1)
  parser.add_argument("--steps", type=int, default=None, help="full-batch Adam steps; 300")
  parser.add_argument("--lr", type=float, default=0.02)
  parser.add_argument("--hidden", type=int, default=32, help="ReLU net width")
  parser.add_argument("--radius", type=float, default=0.5, help="l2 attack size eps*sqrt(d)")
  args = parser.parse_args(argv)
  n = args.n or (40 if args.quick else 200)
  steps = args.steps or (30 if args.quick else 300)
  num_nodes = 12 if args.quick else 24
  eval_every = max(1, steps // 30)

  xtr, ytr = two_moons(n, args.noise, args.seed)
  xte, yte = two_moons(n, args.noise, args.seed + 1)
  xtr, xte = data.standardize(xtr, xte)
  splits = (xtr, ytr, xte, yte)
  k_log, k_net = jax.random.split(jax.random.key(args.seed))
  models = {"Logistic regression": logistic_model(k_log),
            f"Two-layer ReLU net ({args.hidden})": relu_net(k_net, args.hidden)}
  records = {}
  for name, (apply, p0) in models.items():
    records[name] = train_pair(apply, p0, splits, alpha=args.alpha, beta=args.beta,
                               steps=steps, lr=args.lr, eval_every=eval_every,
                               num_nodes=num_nodes, logistic=name.startswith("Logistic"),
                               fast=args.quick)

  rows, adv_rows, gaps = [], [], {}
  for name, (apply, _) in models.items():
    r = records[name]
    for split in ("train", "test"):
      g_own = max_rel_gap(r[f"mix_{split}"], r[f"approx_{split}"])
      g_same = max_rel_gap(r[f"mix_{split}"], r[f"approx_at_a_{split}"])
      gaps[name, split] = g_own
      rows.append([name, split, f"{r[f'mix_{split}'][-1]:.4f}", f"{r[f'approx_{split}'][-1]:.4f}",
                   common.pct(g_own, 1), common.pct(g_same, 1)])
      print(f"{name} ({split}): largest relative gap between the curves {100 * g_own:.1f}% "
            f"(same parameters: {100 * g_same:.1f}%)")
    fn = lambda v, p=r["params_a"], apply=apply: apply(p, v)  # noqa: E731
    approx_adv = float(theory.adversarial_loss_approx(fn, "logistic", xtr, ytr, args.radius))
    attacked = adversarial_loss(fn, xtr, ytr, args.radius)
    adv_rows.append([name, f"{float(theory.standard_loss(fn, 'logistic', xtr, ytr)):.4f}",
                     f"{attacked:.4f}", f"{approx_adv:.4f}"])

  plt = common.pyplot()
  fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 3.6))
  for ax, (name, r) in zip(np.atleast_1d(axes), records.items()):
    ax.plot(r["step"], r["mix_train"], "C0-", label="mixup loss (train)")
    ax.plot(r["step"], r["approx_train"], "C1-", label="approximate loss (train)")
    ax.plot(r["step"], r["mix_test"], "C0--", label="mixup loss (test)")
    ax.plot(r["step"], r["approx_test"], "C1--", label="approximate loss (test)")
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
  figures = [common.save_figure(fig, args.out, "twomoons_losses.png")]
  log_name = next(iter(records))
  fig, ax = plt.subplots(figsize=(4.2, 3.2))
  ax.plot(records[log_name]["step"], records[log_name]["cos_min"])
  ax.set_xlabel("step")
  ax.set_ylabel("R = min_i |cos(theta, x_i)|")
  ax.set_title("Logistic regression, mixup loss")
  figures.append(common.save_figure(fig, args.out, "twomoons_R.png"))

  beta_txt = args.alpha if args.beta is None else args.beta
  table = common.markdown_table(
      ["Model", "Split", "Mixup loss (final)", "Approximate loss (final)",
       "Largest gap between curves (%)", "Largest gap, same parameters (%)"], rows)
  adv = common.markdown_table(
      ["Model (mixup-trained)", "Loss", f"l2-attacked loss (radius {args.radius})",
       "Second-order approximation (Eq. 5/6)"], adv_rows)
  notes = (f"Two moons, n = {n} train / {n} test (noise {args.noise}, standardised); "
           f"lam ~ Beta({args.alpha}, {beta_txt}); full-batch Adam lr {args.lr}, {steps} steps; "
           f"{num_nodes} quadrature nodes over lam. Gap = max over training of "
           "|mixup - approximate| / mixup. 'Same parameters': both losses at the "
           "mixup-trained model (the approximation error itself); the curves compare two "
           "models, each trained and evaluated on its own loss (the paper's Figure 2).")
  report = common.write_report(
      args.out, NAME, "Quadratic approximation of the mixup loss (two moons)",
      [table, notes, "![losses](twomoons_losses.png)", adv, "![R](twomoons_R.png)"])
  return {"records": records, "gaps": gaps, "report": report, "figures": figures}


if __name__ == "__main__":
  main()
