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

The approximation error at the same parameters is a property of where the
expansion is made: Lemma 3.1 expands at lam = 1 (around each x_i), and its
error grows with the logit scale. The last table and figure scale the trained
model's logits by c and compare that expansion and the one around the mean
mixed input (`theory.quadratic_terms(..., center='mean')`) with the exact
mixup loss. `--seeds k` repeats everything on k draws of data and
initialisation (seed, seed + 1, ...; test sets from seed + 1000).
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
from mixjax.input_pipeline import sources

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
      out[f"approx_mean_at_a_{split}"] = theory.approximate_mixup_loss(
          lambda v: apply(pa, v), "logistic", x, y, alpha, beta, center="mean")
    if logistic:
      out["cos_min"] = theory.mixup_radius(pa["w"], xtr, alpha, beta).cos_min
    return out

  sa = sb = train_step_lib.create_train_state({"params": params0}, tx, jax.random.key(0),
                                             ema=False)
  rec = {k: [] for k in ("step", "mix_train", "mix_test", "approx_train", "approx_test",
                         "approx_at_a_train", "approx_at_a_test", "approx_mean_at_a_train",
                         "approx_mean_at_a_test", "cos_min")}
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


SCALES = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


def errors_at_scales(apply, params, logit_params: Callable, data, *, alpha: float,
                     beta: Optional[float], num_nodes: int, scales: Sequence[float],
                     fast: bool = False) -> dict:
  """Relative errors |L~ - L_mix| / L_mix of both expansions of the mixup loss at
  `logit_params(params, c)` (the logits scaled by c) for each c in `scales`.

  Returns {'lam1': f64[S], 'mean': f64[S], 'mix': f64[S]} on the training set (x, y).
  """
  x, y = data

  @functools.partial(common.jit, fast=fast)
  def at(p):
    fn = lambda v: apply(p, v)  # noqa: E731
    mix = theory.mixup_loss_exact(fn, "logistic", x, y, alpha, beta, num_nodes=num_nodes)
    out = {"mix": mix}
    for c in theory.CENTERS:
      out[c] = theory.approximate_mixup_loss(fn, "logistic", x, y, alpha, beta, center=c)
    return out

  rec = {k: [] for k in ("mix",) + theory.CENTERS}
  for c in scales:
    vals = at(logit_params(params, c))
    rec["mix"].append(float(vals["mix"]))
    for k in theory.CENTERS:
      rec[k].append(abs(float(vals[k]) - float(vals["mix"])) / abs(float(vals["mix"])))
  return {k: np.asarray(v) for k, v in rec.items()}


def scale_logits(params, c: float):
  """The parameters with the model's logits multiplied by c (logistic regression: w; the
  ReLU net: its output layer 'head', kernel and bias)."""
  if "w" in params:
    return {"w": c * params["w"]}
  return {**params, "head": jax.tree.map(lambda v: c * v, params["head"])}


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
  parser.add_argument("--seeds", type=int, default=None,
                      help="default 1; each seed (seed, seed + 1, ...) draws its own data and "
                           "initialisation; table cells are then mean ± std over seeds")
  args = parser.parse_args(argv)
  n = args.n or (40 if args.quick else 200)
  steps = args.steps or (30 if args.quick else 300)
  num_nodes = 12 if args.quick else 24
  eval_every = max(1, steps // 30)
  if args.seeds is not None and args.seeds < 1:
    parser.error(f"--seeds must be at least 1, got {args.seeds}")
  seeds = [args.seed + i for i in range(args.seeds or 1)]
  scales = SCALES[1:4] if args.quick else SCALES
  names = ("Logistic regression", f"Two-layer ReLU net ({args.hidden})")

  per_seed = []   # per seed: {name: (record, apply, scale errors)}
  for seed in seeds:
    # Test data from seed + 1000: no seed's test set is another seed's training set.
    xtr, ytr = two_moons(n, args.noise, seed)
    xte, yte = two_moons(n, args.noise, seed + 1000 if len(seeds) > 1 else seed + 1)
    xtr, xte = sources.standardise(xtr, xte)
    splits = (xtr, ytr, xte, yte)
    k_log, k_net = jax.random.split(jax.random.key(seed))
    nets = dict(zip(names, (logistic_model(k_log), relu_net(k_net, args.hidden))))
    out = {}
    for name, (apply, p0) in nets.items():
      rec = train_pair(apply, p0, splits, alpha=args.alpha, beta=args.beta,
                       steps=steps, lr=args.lr, eval_every=eval_every,
                       num_nodes=num_nodes, logistic=name.startswith("Logistic"),
                       fast=args.quick)
      errs = errors_at_scales(apply, rec["params_a"], scale_logits, (xtr, ytr),
                              alpha=args.alpha, beta=args.beta, num_nodes=num_nodes,
                              scales=scales, fast=args.quick)
      out[name] = (rec, apply, errs, (xtr, ytr))
    per_seed.append(out)
    print(f"[seed {seed}: trained]", flush=True)

  def cell(values, digits=1, scale=100.0):
    values = np.asarray(values, np.float64)
    if len(values) == 1:
      return f"{scale * values[0]:.{digits}f}"
    return common.mean_std(values, digits, scale)

  rows, adv_rows, scale_rows, gaps = [], [], [], {}
  for name in names:
    for split in ("train", "test"):
      own, same, same_mean = [], [], []   # each: the largest relative gap over training
      mix_final, approx_final = [], []
      for out in per_seed:
        r = out[name][0]
        own.append(max_rel_gap(r[f"mix_{split}"], r[f"approx_{split}"]))
        same.append(max_rel_gap(r[f"mix_{split}"], r[f"approx_at_a_{split}"]))
        same_mean.append(max_rel_gap(r[f"mix_{split}"], r[f"approx_mean_at_a_{split}"]))
        mix_final.append(r[f"mix_{split}"][-1])
        approx_final.append(r[f"approx_{split}"][-1])
      gaps[name, split] = own[0]
      rows.append([name, split, cell(mix_final, 4, 1.0), cell(approx_final, 4, 1.0),
                   cell(own), cell(same), cell(same_mean)])
      print(f"{name} ({split}): largest relative gap between the curves "
            f"{100 * np.mean(own):.1f}% (same parameters: {100 * np.mean(same):.1f}%)")
    losses, attacked, approx_adv = [], [], []
    for out in per_seed:
      r, apply, _, (xtr, ytr) = out[name]
      fn = lambda v, p=r["params_a"], apply=apply: apply(p, v)  # noqa: E731
      approx_adv.append(float(theory.adversarial_loss_approx(fn, "logistic", xtr, ytr,
                                                             args.radius)))
      attacked.append(adversarial_loss(fn, xtr, ytr, args.radius))
      losses.append(float(theory.standard_loss(fn, "logistic", xtr, ytr)))
    adv_rows.append([name, cell(losses, 4, 1.0), cell(attacked, 4, 1.0),
                     cell(approx_adv, 4, 1.0)])
    for k, c in enumerate(scales):
      errs = [out[name][2] for out in per_seed]
      if name.startswith("Logistic"):
        norms = [c * float(np.linalg.norm(out[name][0]["params_a"]["w"])) for out in per_seed]
        scale_txt = f"{c:g} (|theta| {cell(norms, 2, 1.0)})"
      else:
        scale_txt = f"{c:g}"
      scale_rows.append([name, scale_txt, cell([e["mix"][k] for e in errs], 4, 1.0),
                         cell([e["lam1"][k] for e in errs]), cell([e["mean"][k] for e in errs])])

  records = {name: per_seed[0][name][0] for name in names}
  plt = common.pyplot()
  fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 3.6))
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
  fig, ax = plt.subplots(figsize=(4.2, 3.2))
  ax.plot(records[names[0]]["step"], records[names[0]]["cos_min"])
  ax.set_xlabel("step")
  ax.set_ylabel("R = min_i |cos(theta, x_i)|")
  ax.set_title("Logistic regression, mixup loss")
  figures.append(common.save_figure(fig, args.out, "twomoons_R.png"))
  fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 3.4))
  for ax, name in zip(np.atleast_1d(axes), names):
    for center, style, label in (("lam1", "o-", "expanded at lam = 1 (Lemma 3.1)"),
                                 ("mean", "s--", "expanded at the mean mixed input")):
      errs = np.asarray([out[name][2][center] for out in per_seed]) * 100
      if name.startswith("Logistic"):
        xs = np.asarray([np.asarray(scales) * float(np.linalg.norm(out[name][0]["params_a"]["w"]))
                         for out in per_seed]).mean(0)
      else:
        xs = np.asarray(scales)
      ax.errorbar(xs, errs.mean(0), yerr=errs.std(0), fmt=style, capsize=2, label=label)
    ax.set_xlabel("|theta|" if name.startswith("Logistic") else "logit scale c (output layer x c)")
    ax.set_ylabel("|approx - mixup loss| / mixup loss (%)")
    ax.set_title(name, fontsize=9)
    ax.legend(fontsize=7)
  figures.append(common.save_figure(fig, args.out, "twomoons_scale.png"))

  beta_txt = args.alpha if args.beta is None else args.beta
  seed_txt = (f"one seed ({seeds[0]})" if len(seeds) == 1 else
              f"mean ± std (population) over {len(seeds)} seeds ({seeds[0]}..{seeds[-1]}), "
              "each its own data and initialisation (figures: curves of the first seed)")
  table = common.markdown_table(
      ["Model", "Split", "Mixup loss (final)", "Approximate loss (final)",
       "Largest gap between curves (%)", "Largest gap, same parameters (%)",
       "Same, expansion at the mean mixed input (%)"], rows)
  adv = common.markdown_table(
      ["Model (mixup-trained)", "Loss", f"l2-attacked loss (radius {args.radius})",
       "Second-order approximation (Eq. 5/6)"], adv_rows)
  scale_table = common.markdown_table(
      ["Model (mixup-trained, logits x c)", "c", "Mixup loss (train)",
       "Error of the expansion at lam = 1 (%)", "Error of the expansion at the mean (%)"],
      scale_rows)
  notes = (f"Two moons, n = {n} train / {n} test (noise {args.noise}, standardised); "
           f"lam ~ Beta({args.alpha}, {beta_txt}); full-batch Adam lr {args.lr}, {steps} steps; "
           f"{num_nodes} quadrature nodes over lam; {seed_txt}. Gap = max over training of "
           "|mixup - approximate| / mixup. 'Same parameters': both losses at the "
           "mixup-trained model (the approximation error itself); the curves compare two "
           "models, each trained and evaluated on its own loss (the paper's Figure 2). "
           "Approximations expand at lam = 1 (Lemma 3.1) unless the column says 'at the mean "
           "mixed input' (`theory.quadratic_terms(..., center='mean')`).")
  scale_notes = ("Both second-order expansions of the mixup loss at the final mixup-trained "
                 "parameters with the logits multiplied by c (logistic regression: theta -> c "
                 "theta; the net: its output layer), against the exact mixup loss, train set: "
                 "Lemma 3.1's expansion at lam = 1 (around x_i) and the expansion around the "
                 "mean mixed input (`theory.quadratic_terms(..., center='mean')`).")
  report = common.write_report(
      args.out, NAME, "Quadratic approximation of the mixup loss (two moons)",
      [table, notes, "![losses](twomoons_losses.png)", adv, "![R](twomoons_R.png)",
       scale_table, scale_notes, "![scale](twomoons_scale.png)"])
  return {"records": records, "gaps": gaps, "scale_errors": {n_: [o[n_][2] for o in per_seed]
                                                              for n_ in names},
          "scales": scales, "seeds": seeds, "report": report, "figures": figures}


if __name__ == "__main__":
  main()
