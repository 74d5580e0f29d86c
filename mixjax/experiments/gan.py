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
- PyTorch's default initialisation of linear layers (`Net`).
`--formulations paper` trains the formula above instead (same data). Both keep the
min-max game as written (the generator maximises the discriminator's loss). As in
the paper: fully connected nets with three hidden layers of 512 ReLU units, 2-D
Gaussian noise, minibatches of 128, Adam with default parameters, five
discriminator steps per generator step, samples after 10, 100, 1000, 10000 and
20000 generator iterations. The table counts, per snapshot, the modes that hold at
least 1% of 2000 generated samples within NEAR of their centre, and the fraction
of such samples.
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixjax import losses
from mixjax.experiments import _common as common

NAME = "gan"
STD = 0.01
NEAR = 0.1      # a fifth of the grid spacing
CRITIC_STEPS = 5
FORMULATIONS = ("code", "paper")


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


_TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class Net(nn.Module):
  """3 x `hidden` ReLU MLP, f32[B, 2] -> f32[B, out], initialised as PyTorch's nn.Linear
  (weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))), as in the released script."""
  hidden: int
  out: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i, width in enumerate((self.hidden,) * 3 + (self.out,)):
      bound = 1.0 / np.sqrt(x.shape[-1])
      x = nn.Dense(width, kernel_init=_TORCH_KERNEL_INIT,
                   bias_init=lambda k, shape, dtype=jnp.float32, b=bound: jax.random.uniform(
                       k, shape, dtype, -b, b))(x)
      if i < 3:
        x = nn.relu(x)
    return x


_TX = optax.adam(1e-3)  # "Adam with default parameters"
_CHUNKS: dict = {}


def make_chunk(hidden: int, batch: int, iters: int, mixup: Optional[str]):
  """Jitted `(state, modes f32[25, 2], num_modes, key, lams) -> state`: `iters` generator
  iterations, each after CRITIC_STEPS discriminator steps; `mixup` is None (ERM) or
  one of FORMULATIONS (cached per configuration)."""
  if mixup not in (None,) + FORMULATIONS:
    raise ValueError(f"mixup must be None or one of {FORMULATIONS}, got {mixup!r}.")
  key = (hidden, batch, iters, mixup, common.fast_compile())
  if key not in _CHUNKS:
    _CHUNKS[key] = _make_chunk(Net(hidden, 2), Net(hidden, 1), _TX, batch, iters, mixup)
  return _CHUNKS[key]


def _make_chunk(gen, disc, tx, batch: int, iters: int, mixup: Optional[str]):
  def bce(logits, target):
    return jnp.mean(losses.sigmoid_cross_entropy(logits, target[:, None]))

  def pool(gp, key, modes, num_modes):
    """Real and fake samples f32[2B, 2], shuffled together, with labels 1 / 0 f32[2B]."""
    k_x, k_z, k_perm = jax.random.split(key, 3)
    data = jnp.concatenate([sample_data(k_x, modes, batch, num_modes),
                            gen.apply(gp, jax.random.normal(k_z, (batch, 2)))])
    labels = jnp.concatenate([jnp.ones(batch), jnp.zeros(batch)])
    perm = jax.random.permutation(k_perm, 2 * batch)
    return data[perm], labels[perm]

  def d_loss(dp, gp, key, modes, num_modes, lam, kind):
    """The discriminator's loss of formulation `kind` (lam f32[2B])."""
    if kind == "paper":                        # d(lam x + (1 - lam) g(z)) -> lam
      k_x, k_z = jax.random.split(key)
      x = sample_data(k_x, modes, batch, num_modes)
      fake = gen.apply(gp, jax.random.normal(k_z, (batch, 2)))
      lam = lam[:batch]
      return bce(disc.apply(dp, lam[:, None] * x + (1 - lam[:, None]) * fake), lam)
    k1, k2 = jax.random.split(key)
    data, labels = pool(gp, k1, modes, num_modes)
    if kind == "code":                          # pool mixed with a second pool
      data2, labels2 = pool(gp, k2, modes, num_modes)
      data = lam[:, None] * data + (1 - lam[:, None]) * data2
      labels = lam * labels + (1 - lam) * labels2
    return bce(disc.apply(dp, data), labels)

  g_kind = "paper" if mixup == "paper" else None   # the released code: ERM step for g

  @common.jit
  def chunk(state, modes, num_modes, key, lams):
    def one_iter(state, inputs):
      gp, dp, go, do = state
      key, lam = inputs                                # lam: f32[CRITIC_STEPS + 1, 2B]
      keys = jax.random.split(key, CRITIC_STEPS + 1)

      def d_step(carry, k_l):
        dp, do = carry
        k, l = k_l
        grads = jax.grad(d_loss)(dp, gp, k, modes, num_modes, l, mixup)
        updates, do = tx.update(grads, do, dp)
        return (optax.apply_updates(dp, updates), do), None

      (dp, do), _ = jax.lax.scan(d_step, (dp, do), (keys[:-1], lam[:-1]))
      g_loss = lambda p: -d_loss(dp, p, keys[-1], modes, num_modes, lam[-1], g_kind)  # noqa
      updates, go = tx.update(jax.grad(g_loss)(gp), go, gp)
      return (optax.apply_updates(gp, updates), dp, go, do), None

    state, _ = jax.lax.scan(one_iter, state, (jax.random.split(key, iters), lams))
    return state

  return chunk


def sample_lams(key: jax.Array, mixup: Optional[str], alpha: float, n: int) -> jax.Array:
  """Mixing coefficients f32[n]: Uniform(0, alpha) for 'code', Beta(alpha, alpha) for
  'paper', ones (unused) for ERM (mixup=None)."""
  if mixup == "code":
    if not 0 < alpha <= 1:
      raise ValueError(f"alpha is the upper end of Uniform(0, alpha) in the 'code' "
                       f"formulation and must be in (0, 1], got {alpha!r}.")
    return jax.random.uniform(key, (n,), maxval=alpha)
  if mixup == "paper":
    return common.sample_beta(key, alpha, None, n)
  return jnp.ones(n)


def train(dataset: str, mixup: Optional[str], *, alpha: float, hidden: int,
          snapshots: Sequence[int], seed: int, batch: int = 128, num_samples: int = 2000,
          chunk_iters: int = 10) -> dict:
  """Trains one GAN (mixup: None for ERM, or one of FORMULATIONS); returns generated
  samples f32[num_samples, 2] at each snapshot."""
  if any(s % chunk_iters for s in snapshots):
    raise ValueError(f"snapshots must be multiples of {chunk_iters}, got {list(snapshots)}.")
  gen, disc = Net(hidden, 2), Net(hidden, 1)
  key = jax.random.key(seed)
  k_g, k_d, k_z, key = jax.random.split(key, 4)
  gp = gen.init(k_g, jnp.zeros((1, 2)))
  dp = disc.init(k_d, jnp.zeros((1, 2)))
  state = (gp, dp, _TX.init(gp), _TX.init(dp))
  c = centers(dataset)
  modes = jnp.zeros((25, 2)).at[:len(c)].set(c)  # One shape for both datasets: one compile.
  num_modes = jnp.int32(len(c))
  chunk = make_chunk(hidden, batch, chunk_iters, mixup)
  z_eval = jax.random.normal(k_z, (num_samples, 2))
  out, done = {}, 0
  for target in sorted(snapshots):
    while done < target:
      key, k_run, k_lam = jax.random.split(key, 3)
      lams = sample_lams(k_lam, mixup, alpha, chunk_iters * (CRITIC_STEPS + 1) * 2 * batch)
      lams = lams.reshape(chunk_iters, CRITIC_STEPS + 1, 2 * batch)
      state = chunk(state, modes, num_modes, k_run, lams)
      done += chunk_iters
    out[target] = np.asarray(gen.apply(state[0], z_eval))
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
  args = common.parse(parser, argv)
  unknown = [f for f in args.formulations if f not in FORMULATIONS]
  if unknown:
    parser.error(f"unknown formulations {unknown}; choose from {list(FORMULATIONS)}")
  snapshots = args.snapshots or ([10, 50] if args.quick else [10, 100, 1000, 10000, 20000])
  hidden = args.hidden or (64 if args.quick else 512)
  datasets = ("8gaussians", "25gaussians")
  methods = {"ERM GAN": None}
  methods.update({f"mixup GAN, {f} (alpha = {args.alpha:g})": f for f in args.formulations})
  runs = {}
  for d in datasets:
    for m, f in methods.items():
      runs[d, m] = train(d, f, alpha=args.alpha, hidden=hidden, snapshots=snapshots,
                         seed=args.seed)
      print(f"[{d}, {m}: trained]", flush=True)

  rows = []
  for (d, m), samples in runs.items():
    stats = [mode_stats(samples[s], centers(d)) for s in snapshots]
    rows.append([d, m] + [f"{c}/{len(centers(d))}, {100 * q:.0f}%" for c, q in stats])
  table = common.markdown_table(["Data", "Method"] + [f"iter {s}" for s in snapshots], rows)

  plt = common.pyplot()
  fig, axes = plt.subplots(len(runs), len(snapshots), figsize=(2.2 * len(snapshots),
                                                               2.2 * len(runs)), squeeze=False)
  rng = np.random.default_rng(args.seed)
  for r, ((d, m), samples) in enumerate(runs.items()):
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
  notes = (f"Cells: modes covered (>= 1% of 2000 samples within {NEAR:g} of the centre), "
           f"and the % of samples that close to a mode. Nets 3x{hidden} ReLU, batch 128, Adam "
           f"1e-3, {CRITIC_STEPS} discriminator steps per generator step; blue: data, orange: "
           "generator.")
  report = common.write_report(args.out, NAME, "mixup GAN on toy data",
                               [table, notes, "![samples](gan_samples.png)"])
  return {"runs": runs, "methods": methods, "snapshots": snapshots, "report": report,
          "figures": figures}


if __name__ == "__main__":
  main()
