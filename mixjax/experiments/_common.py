"""What the experiments share: command line, data, small models, a training loop, reports.

The training loop (`fit`) runs one jitted `lax.scan` per epoch. Mixing
coefficients are drawn outside it, in fixed-size pools from one compiled
Beta sampler that takes (alpha, beta) as arguments: every run of a process
shares that compilation, and inside the step the objective gets them through
`fixed_policy`. Any `mixjax.objectives` objective (ERM, mixup at the input or
at a hidden layer, AMP, MixupE, ...) can be trained this way.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixjax import objectives
from mixjax import policies

PyTree = Any


# ----------------------------------------------------------------------------- compilation

_FAST_COMPILE = False


def set_fast_compile(fast: bool) -> None:
  """Compile the experiments' jitted functions with XLA's backend optimisations off.

  For --quick runs of tiny models compilation dominates the run time; this
  roughly halves it (the computed values do not change beyond rounding).
  """
  global _FAST_COMPILE
  _FAST_COMPILE = bool(fast)


def fast_compile() -> bool:
  """Whether `set_fast_compile(True)` is in effect."""
  return _FAST_COMPILE


def jit(fn: Callable, **kwargs) -> Callable:
  """`jax.jit`, with fast compilation when `set_fast_compile(True)`."""
  if _FAST_COMPILE:
    kwargs["compiler_options"] = {"xla_backend_optimization_level": 0}
  return jax.jit(fn, **kwargs)


# ----------------------------------------------------------------------------- command line


def make_parser(name: str, doc: Optional[str]) -> argparse.ArgumentParser:
  """A parser with the flags every experiment has: --quick, --out, --seed."""
  parser = argparse.ArgumentParser(prog=f"python -m mixjax.experiments.{name}",
                                   description=(doc or "").split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="a CPU-minutes version: small models, few steps")
  parser.add_argument("--out", default=os.path.join("results", name),
                      help=f"output folder for {name}.md and the PNG figures "
                           f"(default: results/{name})")
  parser.add_argument("--seed", type=int, default=0, help="base random seed")
  return parser


def parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
  """Parses argv; --quick also turns on fast compilation (`set_fast_compile`)."""
  args = parser.parse_args(argv)
  set_fast_compile(args.quick)
  return args


def csv_floats(text: str) -> list[float]:
  """'0.2,0.5' -> [0.2, 0.5] (argparse type)."""
  try:
    return [float(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def csv_names(text: str) -> list[str]:
  """'erm,mixup' -> ['erm', 'mixup'] (argparse type)."""
  return [t.strip() for t in text.split(",") if t.strip()]


# ----------------------------------------------------------------------------- reports


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A Markdown table; cells are str()-ed."""
  lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def pct(x: float, digits: int = 2) -> str:
  """A fraction as a percentage string."""
  return f"{100.0 * x:.{digits}f}"


def mean_std(values: Sequence[float], digits: int = 2, scale: float = 100.0) -> str:
  """'mean ± std' (population std) of values, scaled (default: to percent)."""
  v = np.asarray(values, np.float64) * scale
  return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"


def write_report(out: str, name: str, title: str, sections: Sequence[str]) -> str:
  """Writes `<out>/<name>.md` (title + sections), prints it and returns its path."""
  os.makedirs(out, exist_ok=True)
  text = f"# {title}\n\n" + "\n\n".join(s.strip() for s in sections) + "\n"
  path = os.path.join(out, f"{name}.md")
  with open(path, "w") as f:
    f.write(text)
  print(text)
  print(f"[wrote {path}]")
  return path


def pyplot():
  """matplotlib.pyplot with the Agg backend (no display needed)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def save_figure(fig, out: str, filename: str) -> str:
  """Saves a matplotlib figure as `<out>/<filename>` (PNG) and closes it."""
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, filename)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  pyplot().close(fig)
  return path


# ----------------------------------------------------------------------------- data


def load_tabular(name: str) -> tuple[np.ndarray, np.ndarray, int]:
  """A small table shipped with scikit-learn: (x f32[N, D], y int32[N], num_classes).

  name: 'iris', 'wine', 'breast_cancer' or 'digits' (8x8 images, flattened, / 16).
  """
  from sklearn import datasets
  loaders = {"iris": datasets.load_iris, "wine": datasets.load_wine,
             "breast_cancer": datasets.load_breast_cancer, "digits": datasets.load_digits}
  if name not in loaders:
    raise ValueError(f"Unknown table {name!r}; choose one of {sorted(loaders)}.")
  d = loaders[name]()
  x = d.data.astype(np.float32)
  if name == "digits":
    x = x / 16.0
  y = d.target.astype(np.int32)
  return x, y, int(y.max()) + 1


def digits_images() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 1797 8x8 digits as images f32[N, 8, 8, 1] in [0, 1], labels int32[N]."""
  x, y, _ = load_tabular("digits")
  return x.reshape(-1, 8, 8, 1), y


def split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Stratified (train indices, test indices), shuffled with `seed`."""
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}.")
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(y):
    idx = rng.permutation(np.flatnonzero(y == c))
    k = max(1, int(round(test_fraction * len(idx))))
    test.append(idx[:k])
    train.append(idx[k:])
  return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
  """Zero mean, unit variance per feature, with the training statistics."""
  mean, std = train.mean(axis=0), train.std(axis=0) + 1e-6
  return [((x - mean) / std).astype(np.float32) for x in (train,) + others]


# ----------------------------------------------------------------------------- models


class MLP(nn.Module):
  """Fully connected ReLU net: hidden layers 'layer1', 'layer2', ..., output 'head'.

  `dropout` > 0 adds dropout after every hidden ReLU (active when train=True).
  The mixup paper's UCI model is `MLP((128, 128), C)`.
  """
  hidden: Sequence[int] = (128, 128)
  num_classes: int = 10
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, name=f"layer{i + 1}")(x))
      if self.dropout:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name="head")(x)


class _Block(nn.Module):
  """Pre-activation residual block (two 3x3 convs, or two dense layers)."""
  features: int
  conv: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    layer = (lambda: nn.Conv(self.features, (3, 3))) if self.conv else (  # noqa: E731
        lambda: nn.Dense(self.features))
    y = layer()(nn.relu(x))
    y = layer()(nn.relu(y))
    return x + y


class ResNet(nn.Module):
  """A small pre-activation ResNet: 'stem', residual 'block1'..'block4', then 'head'.

  conv=True works on images f[B, H, W, C] (3x3 convs, global average pool);
  conv=False on flat vectors (dense residual blocks). The mixup paper's
  ablation mixes "before residual block k" (Layer k, k = 1..4) or before the
  pooling and classifier (Layer 5): `MIX_POINTS[k]`.
  """
  width: int = 32
  num_classes: int = 10
  conv: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.conv:
      x = nn.Conv(self.width, (3, 3), name="stem")(x)
    else:
      x = nn.Dense(self.width, name="stem")(x.reshape((x.shape[0], -1)))
    for k in range(1, 5):
      x = _Block(self.width, self.conv, name=f"block{k}")(x)
    x = nn.relu(x)
    if self.conv:
      x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


MIX_POINTS = {1: "stem", 2: "block1", 3: "block2", 4: "block3", 5: "block4"}


def init(module: nn.Module, sample: np.ndarray, seed: int) -> PyTree:
  """`module.init` on one example (called with train=False); compiled once per module."""
  key = ("init", module, _FAST_COMPILE)
  if key not in _CACHE:
    _CACHE[key] = jit(lambda k, x: module.init(k, x, train=False))
  return _CACHE[key](jax.random.key(seed), jnp.asarray(sample[:1]))


def predictor(module: nn.Module, variables: PyTree) -> Callable[[jax.Array], jax.Array]:
  """Batched eval-mode `x -> logits` (what `mixjax.attacks` and the analyses take)."""
  return lambda x: module.apply(variables, x, train=False)


# ----------------------------------------------------------------------------- mixing coefficients

_POOL = 4096


@jax.jit
def _beta_pool(key: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  return jax.random.beta(key, a, b, (_POOL,), jnp.float32)


def sample_beta(key: jax.Array, alpha: float, beta: Optional[float], n: int) -> jax.Array:
  """`n` draws of Beta(alpha, beta or alpha), f32[n] (one compiled sampler per process)."""
  a = float(alpha)
  b = a if beta is None else float(beta)
  if not (a > 0 and b > 0):
    raise ValueError(f"alpha and beta must be > 0, got {alpha!r} and {beta!r}.")
  keys = jax.random.split(key, max(1, -(-n // _POOL)))
  pools = [_beta_pool(k, jnp.float32(a), jnp.float32(b)) for k in keys]
  return jnp.concatenate(pools)[:n]


def fixed_policy(lam_x: jax.Array, lam_y: Optional[jax.Array] = None) -> policies.Policy:
  """A policy returning given coefficients f32[B] (label weight defaults to `lam_x`)."""
  lam_y = lam_x if lam_y is None else lam_y

  def policy(key, batch_size):
    del key, batch_size
    return policies.Coefficients(lam_x, lam_y)
  return policy


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass
class Fit:
  """A trained model: final `variables` and per-epoch `history` dicts."""
  variables: PyTree
  history: list[dict[str, float]]


ObjectiveFn = Callable[[jax.Array], objectives.Objective]
BatchFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], tuple[PyTree, jax.Array]]


def fit(module: nn.Module, variables: PyTree, objective_fn: ObjectiveFn, x: np.ndarray,
        y: np.ndarray, *, tx: optax.GradientTransformation, epochs: int, batch_size: int,
        seed: int, mix: Optional[tuple[float, Optional[float]]] = None,
        batch_fn: Optional[BatchFn] = None,
        on_epoch: Optional[Callable[[int, PyTree], Mapping[str, float]]] = None) -> Fit:
  """Trains `module` for `epochs` passes over (x, y) in shuffled minibatches.

  Args:
    module: a linen module called as `module(x, train=...)`.
    variables: initial variables ({'params': ..., other collections}).
    objective_fn: `lam f32[B] -> Objective` (built inside the step; `lam` are
      Beta(*mix) draws, or ones when `mix` is None).
    x, y: training inputs f32[N, ...] and labels (int32[N] or f32[N, C]).
    tx: optimizer; epochs; batch_size (the last partial batch is dropped).
    seed: shuffling, coefficients and dropout.
    mix: (alpha, beta) of the coefficients handed to `objective_fn`.
    batch_fn: `(X, Y, idx int32[B], key) -> (inputs, labels)`; default `X[idx], Y[idx]`.
    on_epoch: `(epoch, variables) -> metrics` after every epoch (added to history).
  Returns:
    `Fit`.
  """
  n = len(x)
  steps = n // batch_size
  if steps < 1:
    raise ValueError(f"batch_size={batch_size} is larger than the {n} training examples.")
  X, Y = jnp.asarray(x), jnp.asarray(y)
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  opt_state = tx.init(params)
  epoch_fn = _epoch_fn(module, objective_fn, tx, batch_fn)
  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  history = []
  for e in range(epochs):
    idx = rng.permutation(n)[:steps * batch_size].reshape(steps, batch_size).astype(np.int32)
    key, k_lam, k_steps = jax.random.split(key, 3)
    if mix is None:
      lams = jnp.ones((steps, batch_size), jnp.float32)
    else:
      lams = sample_beta(k_lam, mix[0], mix[1], steps * batch_size).reshape(steps, batch_size)
    params, state, opt_state, loss = epoch_fn(params, state, opt_state, X, Y, idx, lams,
                                              jax.random.split(k_steps, steps))
    record = {"epoch": e + 1, "train_loss": float(loss)}
    if on_epoch is not None:
      record.update(on_epoch(e + 1, {"params": params, **state}))
    history.append(record)
  return Fit({"params": params, **state}, history)


_CACHE: dict[tuple, Callable] = {}


def _epoch_fn(module, objective_fn, tx, batch_fn):
  """The jitted epoch for a (module, objective, optimizer, batch_fn); cached, so runs
  that differ only in data, seed or initial values (e.g. seeds) compile once."""
  key = ("epoch", module, objective_fn, tx, batch_fn, _FAST_COMPILE)
  if key in _CACHE:
    return _CACHE[key]
  apply = objectives.make_apply(module, train=True)
  fetch = batch_fn or (lambda X, Y, idx, key: (X[idx], Y[idx]))

  def epoch_fn(params, state, opt_state, X, Y, idx, lams, keys):
    def step(carry, inputs):
      params, state, opt_state = carry
      idx, lam, key = inputs
      k_batch, k_obj = jax.random.split(key)
      xb, yb = fetch(X, Y, idx, k_batch)
      objective = objective_fn(lam)

      def loss_fn(p):
        loss, (new_state, _) = objective(apply, {"params": p, **state}, xb, yb, k_obj)
        return loss, new_state

      (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), {**state, **new_state}, opt_state), loss

    (params, state, opt_state), losses = jax.lax.scan(step, (params, state, opt_state),
                                                      (idx, lams, keys))
    return params, state, opt_state, jnp.mean(losses)

  _CACHE[key] = jit(epoch_fn)
  return _CACHE[key]


def _forward(module):
  key = ("forward", module, _FAST_COMPILE)
  if key not in _CACHE:
    _CACHE[key] = jit(lambda v, x: module.apply(v, x, train=False))
  return _CACHE[key]


def predict(module: nn.Module, variables: PyTree, x: np.ndarray,
            batch_size: int = 1024) -> np.ndarray:
  """Eval-mode logits f32[N, C] as NumPy, in batches (compiled once per module)."""
  fn = _forward(module)
  return np.concatenate([np.asarray(fn(variables, jnp.asarray(x[i:i + batch_size])))
                         for i in range(0, len(x), batch_size)])


def error_rate(logits: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 error (fraction) of logits f[N, C] against int labels [N]."""
  return float(np.mean(np.argmax(logits, axis=-1) != labels)) if len(labels) else math.nan


def sgd(lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
        total_steps: Optional[int] = None) -> optax.GradientTransformation:
  """SGD with momentum, L2 weight decay and (given total_steps) cosine decay."""
  schedule = optax.cosine_decay_schedule(lr, total_steps) if total_steps else lr
  return optax.chain(optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
                     optax.sgd(schedule, momentum=momentum))
