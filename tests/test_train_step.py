"""The generic train step: an update equals optax's; a non-finite step changes nothing."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mixjax import adapters, objectives
from mixjax import train_step as ts


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(8)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.5)(x))
    return nn.Dense(3)(x)


def _setup(lr=0.1):
  x = jax.random.normal(jax.random.key(0), (8, 5))
  y = jnp.arange(8) % 3
  tx = optax.sgd(lr, momentum=0.9)
  state = ts.create_train_state(Net().init(jax.random.key(1), x), tx, jax.random.key(2),
                                ema=True)
  step = jax.jit(functools.partial(ts.train_step, objective=objectives.erm(num_classes=3),
                                   apply=adapters.make_apply(Net(), train=True), tx=tx,
                                   ema_decay=0.9))
  return state, step, {"inputs": x, "labels": y}, tx


def test_update_equals_optax_reference():
  state, step, batch, tx = _setup()
  new, metrics = step(state, batch)

  def loss_fn(params):
    out, ms = Net().apply({"params": params, **state.model_state}, batch["inputs"], train=True,
                          mutable=["batch_stats"])
    return optax.softmax_cross_entropy(out, jax.nn.one_hot(batch["labels"], 3)).mean(), ms

  (loss, ms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt = tx.update(grads, state.opt_state, state.params)
  chex.assert_trees_all_close(new.params, optax.apply_updates(state.params, updates), rtol=1e-6,
                              atol=1e-7)  # Biases before batch norm: gradients ~1e-9.
  chex.assert_trees_all_close(new.opt_state, opt, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(new.model_state, dict(ms), rtol=1e-6)
  np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-6)
  assert float(metrics["finite"]) == 1.0 and int(new.skipped) == 0 and int(new.step) == 1


def _unchanged(old, new):
  for name in ("params", "opt_state", "model_state", "ema_params", "ema_model_state"):
    for a, b in zip(jax.tree_util.tree_leaves(getattr(old, name)),
                    jax.tree_util.tree_leaves(getattr(new, name))):
      np.testing.assert_array_equal(a, b, err_msg=name)


def test_nan_gradient_step_changes_nothing():
  state, step, batch, _ = _setup()
  bad = {**batch, "inputs": batch["inputs"].at[2, 1].set(jnp.nan)}
  new, metrics = step(state, bad)
  assert float(metrics["finite"]) == 0.0 and int(new.skipped) == 1 and int(new.step) == 1
  _unchanged(state, new)


def test_overflowing_update_is_caught_although_loss_and_gradient_are_finite():
  """A learning rate that overflows float32 turns params to inf/NaN: the step is dropped."""
  state, step, batch, _ = _setup(lr=1e39)
  new, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert float(metrics["finite"]) == 0.0
  _unchanged(state, new)


def test_eval_step_calibration_matches_numpy_ece():
  """15-bin expected calibration error, recomputed in NumPy from the softmax outputs."""
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(40, 4)) * 3, jnp.float32)
  labels = jnp.asarray(rng.integers(0, 4, 40))
  mask = jnp.asarray((np.arange(40) < 37).astype(np.float32))  # Three padding rows.
  apply = lambda v, x, key=None: (x, {})  # noqa: E731  (outputs are the inputs)
  halves = [ts.eval_step({}, {"inputs": logits[s], "labels": labels[s], "mask": mask[s]},
                         apply=apply, num_classes=4) for s in (slice(0, 20), slice(20, 40))]
  sums = jax.tree_util.tree_map(jnp.add, *halves)
  p = np.exp(np.asarray(logits, np.float64))
  p /= p.sum(-1, keepdims=True)
  conf, pred = p.max(-1)[:37], p.argmax(-1)[:37]
  correct = (pred == np.asarray(labels)[:37]).astype(np.float64)
  edges = np.linspace(0, 1, 16)
  ece = sum(np.sum(b) / 37 * abs(correct[b].mean() - conf[b].mean())
            for b in [(conf > lo) & (conf <= hi) for lo, hi in zip(edges[:-1], edges[1:])]
            if np.any(b))
  np.testing.assert_allclose(ts.expected_calibration_error(sums["calibration"]), ece, rtol=1e-5)
  np.testing.assert_allclose(ts.mean_confidence(sums["calibration"]), conf.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(sums["count"]), 37)
  nll = -np.log(p[np.arange(37), np.asarray(labels)[:37]]).sum()
  np.testing.assert_allclose(float(sums["loss"]), nll, rtol=1e-5)


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x)))
    return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


def test_uint8_images_are_normalised_inside_the_step_as_on_the_host():
  """A uint8 batch with `preprocess` gives the step and eval of its host-normalised floats."""
  from mixjax import input_pipeline as ip
  raw = np.random.default_rng(0).integers(0, 256, (8, 6, 6, 3), dtype=np.uint8)
  host = ip.augment.normalise(raw.astype(np.float32) / np.float32(255.0), "imagenet")
  y = jnp.arange(8) % 3
  tx = optax.sgd(0.1, momentum=0.9)
  state = ts.create_train_state(ConvNet().init(jax.random.key(1), host), tx, jax.random.key(2),
                                ema=True)
  kw = dict(objective=objectives.erm(num_classes=3),
            apply=adapters.make_apply(ConvNet(), train=True), tx=tx, ema_decay=0.9)
  pre = ip.device_normaliser("imagenet")
  got, m_got = jax.jit(functools.partial(ts.train_step, preprocess=pre, **kw))(
      state, {"inputs": raw, "labels": y})
  want, m_want = jax.jit(functools.partial(ts.train_step, **kw))(
      state, {"inputs": host, "labels": y})
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m_got["loss"], m_want["loss"], rtol=1e-6)
  ev = functools.partial(ts.eval_step, apply=adapters.make_apply(ConvNet()), num_classes=3)
  variables = {"params": state.params, **state.model_state}
  chex.assert_trees_all_close(
      jax.jit(functools.partial(ev, preprocess=pre))(variables, {"inputs": raw, "labels": y}),
      jax.jit(ev)(variables, {"inputs": host, "labels": y}), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="train_step: .*uint8.*preprocess=input_pipeline"):
    jax.jit(functools.partial(ts.train_step, **kw))(state, {"inputs": raw, "labels": y})
  with pytest.raises(ValueError, match="eval_step: .*uint8.*preprocess="):
    ev(variables, {"inputs": raw, "labels": y})


def test_finiteness_pass_sums_mixed_size_classes_exactly():
  """Leaves of sizes 1, 3, 4 (class 4), 5, 7 (class 8) and 1000 share padded reduces; the norm
  is NumPy's, and a non-finite entry in any one leaf (gradient or update) clears the flag."""
  rng = np.random.default_rng(0)
  shapes = [(1,), (3,), (2, 2), (5,), (7, 1), (10, 100)]
  grads = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
  tx = optax.sgd(0.5, momentum=0.9)
  params = [jnp.zeros(s) for s in shapes]
  opt_state = tx.init(params)
  fn = jax.jit(lambda g, o, loss: ts._grad_norm_and_finite(loss, g, o, params, tx))
  norm, finite = fn(grads, opt_state, 1.0)
  want = np.sqrt(sum(float(np.sum(np.square(np.asarray(g, np.float64)))) for g in grads))
  np.testing.assert_allclose(float(norm), want, rtol=1e-6)
  assert bool(finite)
  assert [ts._bucket(int(np.prod(s))) for s in shapes] == [1, 4, 4, 8, 8, 1024]
  for i in range(len(shapes)):
    for bad in (np.nan, np.inf):
      g = list(grads)
      g[i] = g[i].reshape(-1).at[-1].set(bad).reshape(shapes[i])
      assert not bool(fn(g, opt_state, 1.0)[1]), (i, bad)
  # An update that overflows although every gradient is finite.
  huge = optax.sgd(3e38)
  _, finite = ts._grad_norm_and_finite(jnp.float32(1.0), grads, huge.init(params), params, huge)
  assert not bool(finite)
  assert not bool(fn(grads, opt_state, jnp.nan)[1])
