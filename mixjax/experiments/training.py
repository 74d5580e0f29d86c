"""Training for the experiments: epochs of `mixjax.train_step.train_step` in one `lax.scan`.

`fit` trains a zoo model (`mixjax.models`) on in-memory arrays with any
`mixjax.objectives` objective (`objectives.erm`, `objectives.mixup(policy, ...)`,
`methods.get_objective(...)`, AMP, MixupE, or the `PartnerMixup` below) and an
optax optimizer. Each epoch is one jitted call: a scan over its minibatches of
`train_step`, then `eval_step` on the test set. The model, objective, optimizer
and batch function are static arguments of that call, so runs that differ only
in data, seed or split (e.g. seeds) share one compilation when they pass the
same (or equal) objects.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixjax import losses as losses_lib
from mixjax import mixing
from mixjax import adapters
from mixjax import objectives
from mixjax import policies
from mixjax import train_step as train_step_lib

PyTree = Any
FetchFn = Callable[[tuple, jax.Array, jax.Array], tuple[PyTree, jax.Array]]
# XLA CPU options of a fast compilation: LLVM without optimisations, and the classic
# elemental emitters rather than the fusion emitters (together they halve the compile time
# of the experiments' small programs; the values are the same).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def take_rows(data: tuple, idx: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The default `fetch`: `(X[idx], Y[idx])` of `data = (X, Y)`."""
  del key
  x, y = data[:2]
  return x[idx], y[idx]


@dataclasses.dataclass(frozen=True)
class PartnerMixup:
  """Mixup of each example with a given partner (not one drawn from the batch).

  Called as an objective on `inputs = (x_a, x_b)`, `labels = (y_a, y_b)`
  (each leading axis B; labels int32[B] or f32[B, C]): the model sees
  `lam_x x_a + (1 - lam_x) x_b` and the loss is `lam_y l(f, t_a) + (1 - lam_y)
  l(f, t_b)`, `(lam_x, lam_y) = policy(key, B)`. For partners that come from
  outside the batch (nearest neighbours, a second pool of GAN samples).
  """
  policy: policies.Policy
  loss_fn: losses_lib.LossFn = losses_lib.softmax_cross_entropy
  num_classes: Optional[int] = None
  label_smoothing: float = 0.0

  def __call__(self, apply, variables, inputs, labels, key):
    (xa, xb), (ya, yb) = inputs, labels
    k_lam, k_drop = jax.random.split(key)
    coeffs = self.policy(k_lam, ya.shape[0])
    outputs, state = apply(variables, mixing.mix(xa, xb, coeffs.lam_x), key=k_drop)
    ta = mixing.to_targets(ya, self.num_classes, self.label_smoothing)
    tb = mixing.to_targets(yb, self.num_classes, self.label_smoothing)
    loss = jnp.mean(losses_lib.mixup_loss(self.loss_fn, outputs, ta, tb, coeffs.lam_y))
    return loss, (state, {"loss": loss})


@dataclasses.dataclass
class Fit:
  """A trained model: final `variables` and per-epoch `history` dicts ('epoch',
  'train_loss', and 'test_error' when `fit` was given test data)."""
  variables: PyTree
  history: list[dict[str, float]]


def _epoch(state, data, idx, key, test, *, model, objective, tx, fetch, num_classes):
  apply = adapters.make_apply(model, train=True)

  def step(state, idx):
    inputs, labels = fetch(data, idx, jax.random.fold_in(key, state.step))
    state, metrics = train_step_lib.train_step(state, {"inputs": inputs, "labels": labels},
                                               objective=objective, apply=apply, tx=tx)
    return state, metrics["loss"]

  state, losses = jax.lax.scan(step, state, idx)
  out = {"train_loss": jnp.mean(losses)}
  if test is not None:
    sums = train_step_lib.eval_step({"params": state.params, **state.model_state},
                                    {"inputs": test[0], "labels": test[1]},
                                    apply=adapters.make_apply(model, train=False),
                                    num_classes=num_classes)
    out["test_error"] = 1.0 - sums["top1"] / sums["count"]
  return state, out


def _forward(model, variables, x):
  return model.apply(variables, x, train=False)


_STATIC = ("model", "objective", "tx", "fetch", "num_classes")
# Immutable: the jitted init, epoch and forward pass per compile mode (fast: XLA's backend
# optimisations off); jit's own caches keep one compilation per static arguments.
_JIT = {fast: (jax.jit(train_step_lib.init_variables, static_argnums=0, **opts),
               jax.jit(_epoch, static_argnames=_STATIC, **opts),
               jax.jit(_forward, static_argnums=0, **opts))
        for fast, opts in ((False, {}), (True, {"compiler_options": FAST_COMPILE}))}


def fit(model: nn.Module, objective: objectives.Objective, x: np.ndarray, y: np.ndarray, *,
        tx: optax.GradientTransformation, epochs: int, batch_size: int, seed: int,
        test: Optional[tuple[np.ndarray, np.ndarray]] = None, num_classes: int = 10,
        fetch: FetchFn = take_rows, extra: tuple = (), fast: bool = False) -> Fit:
  """Trains `model` from a fresh initialisation for `epochs` passes over (x, y).

  Args:
    model: a linen module called as `model(x, train=...)` (a zoo model).
    objective: a `mixjax.objectives` objective (hashable: it is a static argument).
    x, y: training inputs f32[N, ...] and labels int32[N] (or f32[N, C]).
    tx: the optax optimizer; epochs; batch_size (the last partial batch is dropped).
    seed: initialisation, shuffling, and the objective's and `fetch`'s keys.
    test: (inputs, int labels) evaluated after every epoch ('test_error').
    num_classes: of the test labels.
    fetch: `(data, idx int32[B], key) -> (inputs, labels)` with `data = (x, y, *extra)`
      as device arrays; default `take_rows`.
    fast: compile with XLA's backend optimisations off (for --quick runs of tiny
      models, where compilation dominates; values change only by rounding).
  Returns:
    `Fit`.
  """
  n = len(x)
  steps = n // batch_size
  if steps < 1:
    raise ValueError(f"batch_size={batch_size} is larger than the {n} training examples.")
  init, epoch, _ = _JIT[bool(fast)]
  k_init, k_state, k_fetch = jax.random.split(jax.random.key(seed), 3)
  state = train_step_lib.create_train_state(init(model, k_init, jnp.asarray(x[:1])), tx,
                                            k_state, ema=False)
  data = tuple(jnp.asarray(a) for a in (x, y) + tuple(extra))
  test = None if test is None else (jnp.asarray(test[0]), jnp.asarray(test[1]))
  rng = np.random.default_rng(seed)
  history = []
  for e in range(epochs):
    idx = rng.permutation(n)[:steps * batch_size].reshape(steps, batch_size).astype(np.int32)
    state, out = epoch(state, data, idx, k_fetch, test, model=model, objective=objective, tx=tx,
                       fetch=fetch, num_classes=num_classes)
    history.append({"epoch": e + 1, **{k: float(v) for k, v in out.items()}})
  return Fit({"params": state.params, **state.model_state}, history)


def predict(model: nn.Module, variables: PyTree, x: np.ndarray, batch_size: int = 1024,
            fast: bool = False) -> np.ndarray:
  """Eval-mode outputs f32[N, C] as NumPy, in batches (`fast` as in `fit`)."""
  forward = _JIT[bool(fast)][2]
  return np.concatenate([np.asarray(forward(model, variables, jnp.asarray(x[i:i + batch_size])))
                         for i in range(0, len(x), batch_size)])


def predictor(model: nn.Module, variables: PyTree) -> Callable[[jax.Array], jax.Array]:
  """Batched eval-mode `x -> logits` (what `mixjax.attacks` and the analyses take)."""
  return lambda x: model.apply(variables, x, train=False)


def error_rate(logits: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 error (fraction) of logits f[N, C] against int labels [N]."""
  return float(np.mean(np.argmax(logits, axis=-1) != labels)) if len(labels) else math.nan


def sgd(lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
        total_steps: Optional[int] = None) -> optax.GradientTransformation:
  """SGD with momentum, L2 weight decay and (given total_steps) cosine decay."""
  schedule = optax.cosine_decay_schedule(lr, total_steps) if total_steps else lr
  return optax.chain(optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
                     optax.sgd(schedule, momentum=momentum))
