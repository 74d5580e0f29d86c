"""mixup GAN on 2-D toy data: 8 Gaussians on a ring, 25 on a grid (mixup paper, Figure 5).

The mixup formulation of a GAN (mixup paper, Section 3.7) as the paper writes it:
  max_g min_d E_{x, z, lam} l(d(lam x + (1 - lam) g(z)), lam),   lam ~ Beta(alpha, alpha)
with l the binary cross-entropy; ERM is the usual
  max_g min_d E l(d(x), 1) + l(d(g(z)), 0).
The authors' released script (hongyi-zhang/mixup, gan/example_gan.py), which made
Figure 5, differs from that formula, and `--formulations code` (the default) follows it:
- the discriminator is trained on mixup of a real-and-fake pool with itself: each
  batch is real and fake samples shuffled together, labelled 1 and 0, and
  example i of one such batch is mixed with example i of a second one, with a
  per-example lam ~ Uniform(0, alpha) for inputs and labels alike (so pairs are
  real-fake, real-real or fake-fake);
- the generator always takes the plain (ERM) step: it maximises the
  discriminator's cross-entropy on an unmixed pool;
- the data: ring of radius 1, grid in [-1, 1]^2, standard deviation 0.01;
- PyTorch's default initialisation of linear layers (`networks`: the zoo's GAN nets
  with `pytorch_init`).
`--formulations paper` trains the formula above instead (same data). It changes
three things at once, and the three single-change variants each take the script's
formulation and change exactly one:
- `code+beta`: lam ~ Beta(alpha, alpha) instead of Uniform(0, alpha);
- `code+real_fake`: every discriminator pair is one real and one fake sample
  (in random order, as the pools pair them; 2 B pairs as in the script) instead
  of pool-with-pool pairs that can be real-real or fake-fake;
- `code+mixed_g`: the generator maximises the discriminator's mixed loss (the
  script's mixing) instead of taking the plain step.
All keep the min-max game as written (the generator maximises the discriminator's
loss). The paper's formula also gives the discriminator B mixed examples per step
where the script gives it 2 B. As in
the paper: fully connected nets with three hidden layers of 512 ReLU units, 2-D
Gaussian noise, minibatches of 128, Adam with default parameters, five
discriminator steps per generator step, samples after 10, 100, 1000, 10000 and
20000 generator iterations. Every step is a `mixjax.train_step.train_step`; the
discriminator's objective is `training.PartnerMixup` (ERM: lam = 1). The table
counts, per snapshot, the modes that hold at least 1% of 2000 generated samples
within NEAR of their centre, and the fraction of such samples.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixjax import losses
from mixjax import models
from mixjax import adapters
from mixjax import policies
from mixjax import train_step as train_step_lib
from mixjax.experiments import common
from mixjax.experiments import training

NAME = "gan"
STD = 0.01
NEAR = 0.1      # a fifth of the grid spacing
CRITIC_STEPS = 5


@dataclasses.dataclass(frozen=True)
class Formulation:
  """How a mixup GAN mixes: lam ('uniform': Uniform(0, alpha); 'beta': Beta(alpha,
  alpha)), the discriminator's pairs ('pools': a real-and-fake pool with a second one;
  'real_first': a real sample with a fake, lam on the real one; 'real_fake': one real
  and one fake in random order) and whether the generator maximises the mixed loss
  (`mixed_g`) or takes the plain GAN step."""
  lam: str
  pairing: str
  mixed_g: bool


FORMULATIONS = {
    "code": Formulation("uniform", "pools", False),       # the released script
    "paper": Formulation("beta", "real_first", True),     # Section 3.7 as written
    "code+beta": Formulation("beta", "pools", False),
    "code+real_fake": Formulation("uniform", "real_fake", False),
    "code+mixed_g": Formulation("uniform", "pools", True),
}
TX = optax.adam(1e-3)  # "Adam with default parameters"


def centers(dataset: str) -> np.ndarray:
  """Mode centres f32[K, 2]: '8gaussians' (ring of radius 1) or '25gaussians' (5 x 5 grid
  on [-1, 1]^2)."""
  if dataset == "8gaussians":
    angles = 2 * np.pi * np.arange(8) / 8
    return np.stack([np.sin(angles), np.cos(angles)], -1).astype(np.float32)
  if dataset == "25gaussians":
    g = np.arange(-2, 3, dtype=np.float32) / 2
    return np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
  raise ValueError(f"Unknown dataset {dataset!r}; choose '8gaussians' or '25gaussians'.")


def sample_data(key: jax.Array, modes: jax.Array, n: int,
                num_modes: Optional[jax.Array] = None) -> jax.Array:
  """n points f32[n, 2]: one of the first `num_modes` (default: all) rows of `modes`,
  uniformly, plus N(0, STD^2 I) noise."""
  k_mode, k_noise = jax.random.split(key)
  idx = jax.random.randint(k_mode, (n,), 0, modes.shape[0] if num_modes is None else num_modes)
  return modes[idx] + STD * jax.random.normal(k_noise, (n, 2))


def mode_stats(samples: np.ndarray, modes: np.ndarray, min_share: float = 0.01):
  """(modes covered, fraction of samples within NEAR of a mode centre)."""
  dist = np.linalg.norm(samples[:, None, :] - modes[None], axis=-1)
  near = dist.min(-1) < NEAR
  counts = np.bincount(dist.argmin(-1)[near], minlength=len(modes))
  return int(np.sum(counts >= min_share * len(samples))), float(near.mean())


def networks(hidden: int) -> tuple[nn.Module, nn.Module]:
  """(generator, discriminator): the zoo's `gan_generator` and `gan_discriminator`, 3 x
  `hidden` ReLU, initialised as PyTorch's nn.Linear, as in the released script."""
  sizes = (hidden,) * 3
  return (models.get_model("gan_generator", hidden_sizes=sizes, pytorch_init=True),
          models.get_model("gan_discriminator", hidden_sizes=sizes, pytorch_init=True))


def uniform_policy(alpha: float) -> policies.Policy:
  """lam ~ Uniform(0, alpha) per example, for inputs and labels alike (the released script)."""
  if not 0 < alpha <= 1:
    raise ValueError(f"alpha is the upper end of Uniform(0, alpha) in the 'code' "
                     f"formulation and must be in (0, 1], got {alpha!r}.")

  def policy(key: jax.Array, batch_size: int) -> policies.Coefficients:
    lam = jax.random.uniform(key, (int(batch_size),), maxval=alpha)
    return policies.Coefficients(lam, lam)
  return policy


def mixing_policy(mixup: Optional[str], alpha: float) -> policies.Policy:
  """The discriminator's coefficients for formulation `mixup` (a FORMULATIONS key):
  Uniform(0, alpha) ('code', 'code+real_fake', 'code+mixed_g'), Beta(alpha, alpha)
  ('paper', 'code+beta'), ones (no mixing) for ERM (mixup=None)."""
  if mixup is not None and mixup not in FORMULATIONS:
    raise ValueError(f"mixup must be None or one of {tuple(FORMULATIONS)}, got {mixup!r}.")
  if mixup is None:
    return policies.erm()
  if FORMULATIONS[mixup].lam == "uniform":
    return uniform_policy(alpha)
  return policies.mixup(alpha)


def num_fakes(mixup: Optional[str], batch: int) -> int:
  """Generated samples `discriminator_batch` takes for formulation `mixup`: 2 B for the
  script's two pools and for 2 B real-fake pairs, B for ERM and the paper's B pairs."""
  if mixup is None or FORMULATIONS[mixup].pairing == "real_first":
    return batch
  return 2 * batch


def discriminator_batch(key: jax.Array, fakes: jax.Array, modes: jax.Array,
                        num_modes: jax.Array, mixup: Optional[str]):
  """The discriminator's `training.PartnerMixup` batch, with generated samples
  f32[num_fakes(mixup, B), 2].

  ERM (None): a pool of B real and B fake samples shuffled together, labelled
  1 / 0, as its own partner. Pairing 'pools' ('code', 'code+beta',
  'code+mixed_g'): two such pools, example i of the first mixed with example i
  of the second. 'real_first' ('paper'): B real samples, each mixed with one
  fake, labels 1 and 0. 'real_fake' ('code+real_fake'): 2 B pairs of one real
  and one fake sample, which one comes first drawn per pair (Bernoulli(1/2)).
  Returns ((x_a, x_b) f32[N, 2], (t_a, t_b) f32[N, 1]).
  """
  def pool(key, fake):
    k_x, k_perm = jax.random.split(key)
    n = fake.shape[0]
    x = jnp.concatenate([sample_data(k_x, modes, n, num_modes), fake])
    t = jnp.concatenate([jnp.ones((n, 1)), jnp.zeros((n, 1))])
    perm = jax.random.permutation(k_perm, 2 * n)
    return x[perm], t[perm]

  k1, k2 = jax.random.split(key)
  pairing = None if mixup is None else FORMULATIONS[mixup].pairing
  if pairing in ("real_first", "real_fake"):  # d(lam x + (1 - lam) g(z)) -> lam
    real = sample_data(k1, modes, fakes.shape[0], num_modes)
    ones, zeros = jnp.ones((len(real), 1)), jnp.zeros((len(real), 1))
    if pairing == "real_first":
      return (real, fakes), (ones, zeros)
    first = jax.random.bernoulli(k2, 0.5, (len(real), 1))   # True: the real one first
    return ((jnp.where(first, real, fakes), jnp.where(first, fakes, real)),
            (jnp.where(first, ones, zeros), jnp.where(first, zeros, ones)))
  if pairing == "pools":                     # a pool mixed with a second pool
    (xa, ta), (xb, tb) = pool(k1, fakes[0::2]), pool(k2, fakes[1::2])
    return (xa, xb), (ta, tb)
  x, t = pool(k1, fakes)
  return (x, x), (t, t)


def _chunk(state, modes, num_modes, key, *, gen, disc, batch: int, iters: int,
           mixup: Optional[str], alpha: float):
  """`iters` generator iterations, each after CRITIC_STEPS discriminator steps, all
  `train_step`s; state = (generator TrainState, discriminator TrainState)."""
  g_apply = adapters.make_apply(gen, train=True)
  d_apply = adapters.make_apply(disc, train=True)
  d_objective = training.PartnerMixup(mixing_policy(mixup, alpha), losses.sigmoid_cross_entropy)
  # The released script: the plain (ERM) step for g; 'paper' and 'code+mixed_g': the mixed loss.
  g_kind = mixup if mixup is not None and FORMULATIONS[mixup].mixed_g else None
  g_target = training.PartnerMixup(mixing_policy(g_kind, alpha), losses.sigmoid_cross_entropy)
  d_fakes, g_fakes = num_fakes(mixup, batch), num_fakes(g_kind, batch)

  def one_iter(state, key):
    g_state, d_state = state
    g_vars = {"params": g_state.params}
    keys = jax.random.split(key, CRITIC_STEPS + 1)

    def d_step(d_state, key):
      k_z, k_batch = jax.random.split(key)
      fakes, _ = g_apply(g_vars, jax.random.normal(k_z, (d_fakes, 2)))
      inputs, labels = discriminator_batch(k_batch, fakes, modes, num_modes, mixup)
      d_state, _ = train_step_lib.train_step(d_state, {"inputs": inputs, "labels": labels},
                                             objective=d_objective, apply=d_apply, tx=TX)
      return d_state, None

    d_state, _ = jax.lax.scan(d_step, d_state, keys[:-1])
    d_vars = {"params": d_state.params}

    def g_objective(apply, variables, inputs, labels, key):  # max_g of the discriminator's loss
      del labels
      k_batch, k_loss = jax.random.split(key)
      fakes, _ = apply(variables, inputs)
      d_inputs, d_labels = discriminator_batch(k_batch, fakes, modes, num_modes, g_kind)
      d_loss, _ = g_target(d_apply, d_vars, d_inputs, d_labels, k_loss)
      return -d_loss, ({}, {"loss": -d_loss})

    z = jax.random.normal(keys[-1], (g_fakes, 2))  # (No labels: g_objective makes its own.)
    g_state, _ = train_step_lib.train_step(g_state, {"inputs": z, "labels": z},
                                           objective=g_objective, apply=g_apply, tx=TX)
    return (g_state, d_state), None

  state, _ = jax.lax.scan(one_iter, state, jax.random.split(key, iters))
  return state


_STATIC = ("gen", "disc", "batch", "iters", "mixup", "alpha")
# Immutable: the jitted chunk per compile mode (jit's cache keeps one per configuration).
_CHUNK = {fast: jax.jit(_chunk, static_argnames=_STATIC, **opts)
          for fast, opts in ((False, {}), (True, {"compiler_options": training.FAST_COMPILE}))}


def train(dataset: str, mixup: Optional[str], *, alpha: float, hidden: int,
          snapshots: Sequence[int], seed: int, batch: int = 128, num_samples: int = 2000,
          chunk_iters: int = 10, fast: bool = False) -> dict:
  """Trains one GAN (mixup: None for ERM, or one of FORMULATIONS); returns generated
  samples f32[num_samples, 2] at each snapshot (`fast`: unoptimised compilation)."""
  mixing_policy(mixup, alpha)  # Validates mixup and alpha.
  if any(s % chunk_iters for s in snapshots):
    raise ValueError(f"snapshots must be multiples of {chunk_iters}, got {list(snapshots)}.")
  gen, disc = networks(hidden)
  k_g, k_d, k_gs, k_ds, k_z, key = jax.random.split(jax.random.key(seed), 6)
  state = tuple(train_step_lib.create_train_state(
      train_step_lib.init_variables(net, k, jnp.zeros((1, 2))), TX, k_state, ema=False)
      for net, k, k_state in ((gen, k_g, k_gs), (disc, k_d, k_ds)))
  c = centers(dataset)
  modes = jnp.zeros((25, 2)).at[:len(c)].set(c)  # One shape for both datasets: one compile.
  num_modes = jnp.int32(len(c))
  chunk = _CHUNK[bool(fast)]
  z_eval = jax.random.normal(k_z, (num_samples, 2))
  out, done = {}, 0
  for target in sorted(snapshots):
    while done < target:
      key, k_run = jax.random.split(key)
      state = chunk(state, modes, num_modes, k_run, gen=gen, disc=disc, batch=batch,
                    iters=chunk_iters, mixup=mixup, alpha=float(alpha))
      done += chunk_iters
    out[target] = np.asarray(gen.apply({"params": state[0].params}, z_eval))
  return out


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = common.make_parser(NAME, __doc__)
  parser.add_argument("--formulations", type=common.csv_names, default=["code"],
                      help="mixup GANs to train beside ERM, from "
                           f"{','.join(FORMULATIONS)} (default: code)")
  parser.add_argument("--alpha", type=float, default=0.2,
                      help="lam ~ Uniform(0, alpha) ('code') or Beta(alpha, alpha) ('paper')")
  parser.add_argument("--snapshots", type=lambda s: [int(v) for v in common.csv_floats(s)],
                      default=None, help="generator iterations to plot "
                      "(default 10,100,1000,10000,20000; --quick: 10,50)")
  parser.add_argument("--hidden", type=int, default=None, help="width (default 512; quick 64)")
  parser.add_argument("--seeds", type=int, default=1,
                      help="runs per cell, seeds seed, seed + 1, ... (default 1); cells are "
                           "then mean ± std over seeds and the figure shows the first seed")
  parser.add_argument("--datasets", type=common.csv_names,
                      default=["8gaussians", "25gaussians"],
                      help="from 8gaussians,25gaussians (default: both)")
  args = parser.parse_args(argv)
  bad = [d for d in args.datasets if d not in ("8gaussians", "25gaussians")]
  if bad:
    parser.error(f"unknown datasets {bad}; choose from 8gaussians, 25gaussians")
  unknown = [f for f in args.formulations if f not in FORMULATIONS]
  if unknown:
    parser.error(f"unknown formulations {unknown}; choose from {list(FORMULATIONS)}")
  if args.seeds < 1:
    parser.error(f"--seeds must be at least 1, got {args.seeds}")
  snapshots = args.snapshots or ([10, 50] if args.quick else [10, 100, 1000, 10000, 20000])
  hidden = args.hidden or (64 if args.quick else 512)
  seeds = [args.seed + i for i in range(args.seeds)]
  datasets = tuple(args.datasets)
  methods = {"ERM GAN": None}
  methods.update({f"mixup GAN, {f} (alpha = {args.alpha:g})": f for f in args.formulations})
  runs, stats = {}, {}
  for d in datasets:
    for m, f in methods.items():
      for seed in seeds:
        runs[d, m, seed] = train(d, f, alpha=args.alpha, hidden=hidden, snapshots=snapshots,
                                 seed=seed, fast=args.quick)
        print(f"[{d}, {m}, seed {seed}: trained]", flush=True)
      # f32[seeds, snapshots, 2]: (modes covered, fraction of samples near a mode).
      stats[d, m] = np.asarray([[mode_stats(runs[d, m, seed][s], centers(d)) for s in snapshots]
                                for seed in seeds], np.float64)

  rows = []
  for (d, m), st in stats.items():
    k = len(centers(d))
    if len(seeds) == 1:
      cells = [f"{c:.0f}/{k}, {100 * q:.0f}%" for c, q in st[0]]
    else:
      cells = [f"{c.mean():.1f} ± {c.std():.1f} /{k}, {100 * q.mean():.0f}%"
               for c, q in zip(st[:, :, 0].T, st[:, :, 1].T)]
    rows.append([d, m] + cells)
  table = common.markdown_table(["Data", "Method"] + [f"iter {s}" for s in snapshots], rows)

  plt = common.pyplot()
  shown = [(d, m) for d in datasets for m in methods]
  fig, axes = plt.subplots(len(shown), len(snapshots), figsize=(2.2 * len(snapshots),
                                                                2.2 * len(shown)), squeeze=False)
  rng = np.random.default_rng(args.seed)
  for r, (d, m) in enumerate(shown):
    samples = runs[d, m, seeds[0]]
    real = centers(d)[rng.integers(0, len(centers(d)), 1000)] + STD * rng.normal(size=(1000, 2))
    for c, s in enumerate(snapshots):
      ax = axes[r, c]
      ax.scatter(real[:, 0], real[:, 1], s=1, c="C0")
      ax.scatter(samples[s][:, 0], samples[s][:, 1], s=1, c="C1")
      ax.set_xlim(-1.5, 1.5)
      ax.set_ylim(-1.5, 1.5)
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(f"iteration {s}", fontsize=9)
      if c == 0:
        ax.set_ylabel(f"{d}\n{m.split(' (')[0]}", fontsize=8)
  figures = [common.save_figure(fig, args.out, "gan_samples.png")]
  seed_txt = (f"seed {seeds[0]}" if len(seeds) == 1 else
              f"mean ± std (population) over {len(seeds)} seeds ({seeds[0]}..{seeds[-1]}), "
              "each its own initialisation and draws; the figure shows the first seed")
  notes = (f"Cells: modes covered (>= 1% of 2000 samples within {NEAR:g} of the centre), "
           f"and the % of samples that close to a mode; {seed_txt}. Nets 3x{hidden} ReLU, "
           f"batch 128, Adam 1e-3, {CRITIC_STEPS} discriminator steps per generator step; "
           "blue: data, orange: generator.")
  report = common.write_report(args.out, NAME, "mixup GAN on toy data",
                               [table, notes, "![samples](gan_samples.png)"])
  return {"runs": runs, "stats": stats, "methods": methods, "snapshots": snapshots,
          "seeds": seeds, "report": report, "figures": figures}


if __name__ == "__main__":
  main()
