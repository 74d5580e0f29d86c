"""Train state, one generic train step and an eval step (plain functions; jit them).

The train step is generic over `mixjax.objectives` objectives: anything called
as `objective(apply, variables, inputs, labels, key) -> (loss, (new_model_state,
metrics))` (ERM, the mixup family, AMP, MixupE and their combinations).
Under `jit` with the batch sharded over a 'data' mesh axis, batch norm
statistics are global-batch statistics and gradients are global means.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixjax import adapters
from mixjax import losses as losses_lib
from mixjax import objectives as objectives_lib
from mixjax import optim

PyTree = Any
Batch = dict[str, jax.Array]
Preprocess = Callable[[PyTree], PyTree]


def _preprocess(inputs: PyTree, preprocess: Optional[Preprocess], caller: str) -> PyTree:
  """`preprocess(inputs)`, or inputs as they are; ValueError for uint8 inputs without one."""
  if preprocess is not None:
    return preprocess(inputs)
  if any(jnp.result_type(x) == jnp.uint8 for x in jax.tree_util.tree_leaves(inputs)):
    raise ValueError(f"{caller}: batch['inputs'] are uint8 images; pass preprocess="
                     "input_pipeline.device_normaliser(<dataset.normalize>) to normalise them "
                     "on the device, or convert them first (x.astype(jnp.float32) / 255).")
  return inputs


class TrainState(flax.struct.PyTreeNode):
  """Everything a run needs to continue exactly.

  step: int32[]; params: f32 model parameters; model_state: mutable model
  collections ({'batch_stats': ...} or {}); opt_state: optimizer state;
  ema_params / ema_model_state: Polyak averages ({} when EMA is off);
  rng: uint32[2] raw key data of the run's base key (step keys are
  `fold_in(key, step)`); skipped: int32[] count of non-finite steps dropped.
  """
  step: jax.Array
  params: PyTree
  model_state: PyTree
  opt_state: PyTree
  ema_params: PyTree
  ema_model_state: PyTree
  rng: jax.Array
  skipped: jax.Array


def init_variables(module: nn.Module, key: jax.Array, sample_inputs: PyTree,
                   train_arg: Optional[str] = "train") -> PyTree:
  """`module.init` on a sample batch (called as `module(x, train=False)`)."""
  k_params, k_drop = jax.random.split(key)
  kwargs = {train_arg: False} if train_arg else {}
  return module.init({"params": k_params, "dropout": k_drop}, sample_inputs, **kwargs)


def create_train_state(variables: PyTree, tx: optax.GradientTransformation, key: jax.Array,
                       ema: bool) -> TrainState:
  """A fresh `TrainState` from initialised `variables` ({'params': ..., **model_state})."""
  variables = dict(variables)
  params = variables.pop("params")
  model_state = variables
  copy = lambda t: jax.tree_util.tree_map(jnp.array, t)  # noqa: E731
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
      opt_state=tx.init(params),
      ema_params=copy(params) if ema else {}, ema_model_state=copy(model_state) if ema else {},
      rng=jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key,
      skipped=jnp.zeros((), jnp.int32))


def train_step(state: TrainState, batch: Batch, *, objective: objectives_lib.Objective,
               apply: adapters.ApplyFn, tx: optax.GradientTransformation,
               schedule: Optional[optax.Schedule] = None, ema_decay: float = 0.0,
               accum_steps: int = 1, preprocess: Optional[Preprocess] = None,
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update on a global batch.

  Args:
    state: the `TrainState`.
    batch: {'inputs': pytree with leading axis B, 'labels': int32[B] or f32[B, C]}.
    objective, apply: see `mixjax.objectives`.
    tx: the optax optimizer; schedule: for the 'lr' metric.
    ema_decay: Polyak decay of params and model state (0: no EMA).
    accum_steps: split the batch into this many micro-batches (example i goes
      to micro-batch i % accum_steps, so shards stay on their devices) and
      average their gradients in a `lax.scan`; model state threads through.
    preprocess: applied to `batch['inputs']` first, inside the step (e.g.
      `input_pipeline.device_normaliser(name)` for uint8 images, which then
      cross to the device at a quarter of the float32 bytes). uint8 inputs
      without it raise ValueError.
  Returns:
    (new state, metrics: f32[] scalars incl. 'loss', 'grad_norm', 'lr', 'finite').
    A step with a non-finite loss, gradient norm or update norm (an update
    that overflows, e.g. from a huge learning rate) leaves params, optimizer
    and model state unchanged ('finite' = 0); the caller stops or skips. The
    flag is computed before anything changes, from the loss and one pass over
    the gradients and optimizer state (`_grad_norm_and_finite`); each new
    leaf is then one `where(finite, new, old)` fused into the pass that
    computes it, so no leaf is copied.
  """
  batch = {**batch, "inputs": _preprocess(batch["inputs"], preprocess, "train_step")}
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

  def loss_fn(params, model_state, inputs, labels, k):
    variables = {"params": params, **model_state}
    return objective(apply, variables, inputs, labels, k)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    (loss, (model_state, metrics)), grads = grad_fn(
        state.params, state.model_state, batch["inputs"], batch["labels"], key)
  else:
    def split(x):
      x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:])
      return jnp.swapaxes(x, 0, 1)
    micro = jax.tree_util.tree_map(split, (batch["inputs"], batch["labels"]))

    def body(carry, xs):
      model_state, grad_sum = carry
      i, (inputs, labels) = xs
      (loss, (model_state, metrics)), g = grad_fn(
          state.params, model_state, inputs, labels, jax.random.fold_in(key, i))
      grad_sum = jax.tree_util.tree_map(jnp.add, grad_sum, g)
      return (model_state, grad_sum), (loss, metrics)

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    (model_state, grad_sum), (losses, metrics) = jax.lax.scan(
        body, (state.model_state, zeros), (jnp.arange(accum_steps), micro))
    grads = jax.tree_util.tree_map(lambda g: g / accum_steps, grad_sum)
    loss = jnp.mean(losses)
    metrics = jax.tree_util.tree_map(jnp.mean, metrics)

  model_state = {k: v for k, v in dict(model_state).items() if k in state.model_state}
  grad_norm, finite = _grad_norm_and_finite(loss, grads, state.opt_state, state.params, tx)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  select = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
      lambda n, o: jnp.where(finite, n, o), new, old)
  params = select(optax.apply_updates(state.params, updates), state.params)
  opt_state, model_state = select((opt_state, model_state), (state.opt_state, state.model_state))
  ema_params, ema_model_state = state.ema_params, state.ema_model_state
  if ema_decay:
    ema_params = optim.ema_update(state.ema_params, params, ema_decay)
    ema_model_state = optim.ema_update(state.ema_model_state, model_state, ema_decay)
  new_state = state.replace(step=state.step + 1, params=params, model_state=model_state,
                            opt_state=opt_state, ema_params=ema_params,
                            ema_model_state=ema_model_state,
                            skipped=state.skipped + (~finite).astype(jnp.int32))
  metrics = dict(metrics)
  metrics.update(loss=loss, grad_norm=grad_norm, finite=finite.astype(jnp.float32))
  if schedule is not None:
    metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
  return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


def _grad_norm_and_finite(loss: jax.Array, grads: PyTree, opt_state: PyTree, params: PyTree,
                          tx: optax.GradientTransformation) -> tuple[jax.Array, jax.Array]:
  """(f32[] global gradient norm, bool[] loss, gradient norm and update norm all finite).

  One read of the gradients and optimizer state, and one reduction per
  power-of-two size class of the leaves (`_bucket`): the leaves of a class
  are zero-padded to its size and summed elementwise (g1^2 + g2^2 + ...)
  inside one variadic reduce that sums g^2 and u^2 together (the padding is
  fused: no leaf is copied, and a reduce evaluates at most twice the elements
  it reads), where the update u is recomputed elementwise from the gradient
  and optimizer state. The optimization barrier keeps XLA from sharing that
  recomputation with the update that is applied later, which would make it
  write the whole update tree to memory and read it back. A non-finite
  gradient makes its norm non-finite, and an update that overflows (a huge
  learning rate) makes the update's norm non-finite.
  """
  updates, _ = tx.update(*jax.lax.optimization_barrier((grads, opt_state, params)))
  by_size: dict[int, list[tuple[jax.Array, jax.Array]]] = {}
  for g, u in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(updates)):
    by_size.setdefault(_bucket(g.size), []).append((g, u))
  zero = jnp.zeros((), jnp.float32)

  def sq(xs, n):  # sum_i pad(x_i^2) over leaves of up to n elements: f32[n], fused in the reduce.
    return sum(jnp.pad(jnp.square(x.astype(jnp.float32)).ravel(), (0, n - x.size)) for x in xs)

  sums = jnp.stack([s for n, p in by_size.items() for s in jax.lax.reduce(
      (sq([g for g, _ in p], n), sq([u for _, u in p], n)), (zero, zero),
      lambda a, b: (a[0] + b[0], a[1] + b[1]), (0,))]).reshape(-1, 2)
  # Added by a dot, which XLA does not fuse into the update: each update fusion
  # then takes the two totals instead of re-adding one sum per leaf size.
  g_sq, u_sq = jnp.dot(jnp.ones(sums.shape[0], jnp.float32), sums,
                       precision=jax.lax.Precision.HIGHEST)  # Full f32 on TPU/GPU too.
  grad_norm = jnp.sqrt(g_sq)
  return grad_norm, jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(u_sq)


def _bucket(size: int) -> int:
  """The smallest power of two >= size (a leaf's size class in `_grad_norm_and_finite`)."""
  return 1 << max(0, int(size) - 1).bit_length()


def eval_step(variables: PyTree, batch: Batch, *, apply: adapters.ApplyFn,
              num_classes: int,
              loss_fn: losses_lib.LossFn = losses_lib.softmax_cross_entropy,
              to_logits: Callable[[jax.Array], jax.Array] = lambda x: x,
              calibration_bins: int = 15,
              preprocess: Optional[Preprocess] = None) -> dict[str, jax.Array]:
  """Sums over a batch: {'loss', 'top1', 'top5', 'count'} (f32[]) and 'calibration'.

  batch: {'inputs', 'labels': int32[B], 'mask': f32[B] (0 for padding)}.
  `apply` runs the model in eval mode; `to_logits` maps outputs to class scores.
  'calibration' is f32[3, calibration_bins]: per equal-width bin of the
  confidence max_c softmax(logits)_c, the count, the summed confidence and
  the summed correctness; sum it over batches and pass it to
  `expected_calibration_error`. With softmax cross-entropy 'loss' / 'count'
  is the negative log-likelihood. `preprocess`: as in `train_step`.
  """
  outputs, _ = apply(variables, _preprocess(batch["inputs"], preprocess, "eval_step"), key=None)
  labels = batch["labels"]
  mask = batch.get("mask", jnp.ones(labels.shape[0], jnp.float32))
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  loss = loss_fn(outputs.astype(jnp.float32), targets)
  logits = to_logits(outputs).astype(jnp.float32)
  k = min(5, num_classes)
  topk = jax.lax.top_k(logits, k)[1]
  top1 = (topk[:, 0] == labels).astype(jnp.float32)
  top5 = jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)
  conf = jnp.max(jax.nn.softmax(logits), axis=-1)
  bins = jnp.clip((conf * calibration_bins).astype(jnp.int32), 0, calibration_bins - 1)
  onehot = jax.nn.one_hot(bins, calibration_bins, dtype=jnp.float32) * mask[:, None]
  calibration = jnp.stack([onehot.sum(0), conf @ onehot, top1 @ onehot])
  return {"loss": jnp.sum(loss * mask), "top1": jnp.sum(top1 * mask),
          "top5": jnp.sum(top5 * mask), "count": jnp.sum(mask), "calibration": calibration}


def expected_calibration_error(calibration: Any) -> float:
  """ECE = sum_b (n_b / n) |acc_b - conf_b| from `eval_step`'s summed 'calibration' f32[3, bins]."""
  count, conf, correct = (np.asarray(r, np.float64) for r in calibration)
  total = count.sum()
  if total <= 0:
    raise ValueError("expected_calibration_error needs at least one evaluated example.")
  return float(np.sum(np.abs(correct - conf)) / total)


def mean_confidence(calibration: Any) -> float:
  """Mean top-1 softmax probability from `eval_step`'s summed 'calibration' f32[3, bins].

  Minus top-1 accuracy, it says the direction of miscalibration: > 0
  over-confident, < 0 under-confident (ECE only says how far).
  """
  count, conf, _ = (np.asarray(r, np.float64) for r in calibration)
  if count.sum() <= 0:
    raise ValueError("mean_confidence needs at least one evaluated example.")
  return float(conf.sum() / count.sum())
