"""AMP at a hidden point of an unmodified flax.nnx model: the layers below the point run once.

`adapters.make_nnx_apply` returns an `NnxApply`, which runs the model split at
any submodule (`hidden.nnx_capture_below` / `hidden.nnx_inject_at`). The
references: the same apply with `encodes_at` hidden (every AMP lambda pass
runs the whole model, the former path) and central finite differences.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import train_testlib as lib
from flax import nnx

from benchmarks import reference_models
from mixjax import adapters, amp, hidden, mixupe, objectives, policies
from mixjax import train_step as train_step_lib


class _Block(nnx.Module):
  def __init__(self, c: int, rngs: nnx.Rngs, dtype=jnp.float32):
    self.conv = nnx.Conv(c, c, (3, 3), rngs=rngs, dtype=dtype, param_dtype=dtype)
    self.bn = nnx.BatchNorm(c, rngs=rngs, dtype=dtype, param_dtype=dtype)

  def __call__(self, x):
    return jax.nn.relu(x + self.bn(self.conv(x)))


class ResCNN(nnx.Module):
  """A small residual CNN with batch norm and dropout, unmodified: f[B, H, W, 2] -> f[B, 3].

  Mixing points: 'blocks/1' mid-way (a dropout layer above it), 'blocks/2/bn'
  the last hidden layer with parameters below the classifier.
  """

  def __init__(self, rngs: nnx.Rngs, dtype=jnp.float32):
    self.stem = nnx.Conv(2, 4, (3, 3), rngs=rngs, dtype=dtype, param_dtype=dtype)
    self.stem_bn = nnx.BatchNorm(4, rngs=rngs, dtype=dtype, param_dtype=dtype)
    self.blocks = nnx.List([_Block(4, rngs, dtype) for _ in range(3)])
    self.drop = nnx.Dropout(0.3, rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs, dtype=dtype, param_dtype=dtype)

  def __call__(self, x):
    x = jax.nn.relu(self.stem_bn(self.stem(x)))
    x = self.blocks[0](x)
    x = self.drop(self.blocks[1](x))
    x = self.blocks[2](x)
    return self.head(x.mean(axis=(1, 2)))


class _Twice(nnx.Module):
  """One submodule called twice: the second call sees the mixed first one, so no split."""

  def __init__(self, rngs: nnx.Rngs):
    self.shared = nnx.Linear(4, 4, rngs=rngs)
    self.out = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(self.shared(jnp.tanh(self.shared(x))))


def _batch(b=8, seed=1, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(b, 6, 6, 2)), dtype), jnp.asarray(rng.integers(0, 3, b)))


def _max_diff(a, b):
  return max(float(jnp.abs(u - w).max()) for u, w in
             zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.mark.parametrize("point, mode", [("blocks/1", "full"), ("blocks/2/bn", "max")])
def test_fast_path_equals_whole_model_passes(point, mode):
  """Loss, parameter gradient, new nnx_state (batch statistics, RNG counters), metrics; fewer FLOPs."""
  apply, v = adapters.make_nnx_apply(ResCNN(nnx.Rngs(0, dropout=1)))
  x, y = _batch()
  obj = amp.amp(objectives.mixup(policies.mixup(1.0), num_classes=3, point=point), eps=0.05,
                mode=mode)
  assert isinstance(apply, adapters.NnxApply) and obj.fast_path(apply)
  assert not obj.fast_path(lib.whole_model_passes(apply))

  state, metrics = lib.assert_fast_path_equals_whole_model(
      obj, apply, lib.whole_model_passes(apply), v, x, y)
  assert float(metrics["amp_grad_abs"]) > 0 and float(metrics["amp_dlam"]) != 0
  # Every statistic moved once, below the point too (as in a mixup pass, whose
  # layers below the point see the same inputs).
  stem = lambda s: s["nnx_state"]["stem_bn"]["mean"][...]  # noqa: E731
  assert not np.allclose(stem(state), stem(v))
  mixup = objectives.mixup(policies.mixup(1.0), num_classes=3, point=point)
  mixed = jax.jit(lambda vs: mixup(apply, vs, x, y, jax.random.key(3))[1][0])(v)
  np.testing.assert_allclose(stem(state), stem(mixed), rtol=1e-5)


def _f64(tree):
  return jax.tree_util.tree_map(
      lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _xent64(logits, labels):
  return -jnp.sum(jax.nn.log_softmax(logits) * labels, axis=-1)


def test_lambda_gradient_matches_whole_model_and_finite_differences():
  """d L / d lam through the layers above the point only (dropout above it, f64)."""
  with jax.enable_x64(True):
    apply, v = adapters.make_nnx_apply(ResCNN(nnx.Rngs(0, dropout=1), dtype=jnp.float64))
    x, y = _batch(6, seed=2, dtype=jnp.float64)
    base = objectives.mixup(policies.untied_mixup(0.7, 1.3), num_classes=3, point="blocks/1",
                            loss_fn=_xent64)
    draw = base.draw(jax.random.key(1), x, y)
    lam = jnp.asarray(draw.coeffs.lam_x, jnp.float64)
    key = jax.random.key(2)
    obj = amp.amp(base)
    prepared = objectives.Prepared(draw, key, None, {})
    encoded = apply.run_encoder(v, x, key, "blocks/1")
    assert len(encoded.below) == 3  # stem, stem_bn, blocks/0: top-level calls, not nested ones.
    lib.assert_lambda_gradient(obj.lambda_loss(apply, v, x, prepared._replace(encoded=encoded)),
                               obj.lambda_loss(lib.whole_model_passes(apply), v, x, prepared), lam)


def test_head_pass_starts_from_the_encoders_state_and_hooks_apply():
  """The head pass runs only the layers above the point, from the state after it, inside the hooks."""
  apply, v = adapters.make_nnx_apply(ResCNN(nnx.Rngs(0, dropout=1)))
  x, _ = _batch()
  key = jax.random.key(4)
  spec = adapters.MixSpec("blocks/1", jnp.linspace(0.2, 0.9, 8), jnp.arange(8)[::-1])
  with adapters.recording_batch_norm(8) as whole_calls:
    ref_out, ref_state = apply(v, x, key=key, mix=spec)
  with adapters.recording_batch_norm(8) as encoder_calls:
    encoded = apply.run_encoder(v, x, key, "blocks/1")
  with adapters.recording_batch_norm(8) as head_calls:
    out, state = apply.run_head(encoded, key, spec)
  assert (len(whole_calls), len(encoder_calls), len(head_calls)) == (4, 4, 1)
  np.testing.assert_allclose(out, ref_out, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(state, ref_state, rtol=1e-6, atol=1e-7)
  # The encoder's state: stem_bn and blocks 0, 1 moved, block 2 did not; the
  # dropout counter (above the point) not yet.
  enc, init, new = encoded.state["nnx_state"], v["nnx_state"], ref_state["nnx_state"]
  mean = lambda s, *p: functools.reduce(lambda t, k: t[k], p, s)["mean"][...]  # noqa: E731
  for path in (("stem_bn",), ("blocks", 0, "bn"), ("blocks", 1, "bn")):
    np.testing.assert_allclose(mean(enc, *path), mean(new, *path), rtol=1e-6)
  np.testing.assert_array_equal(mean(enc, "blocks", 2, "bn"), mean(init, "blocks", 2, "bn"))
  count = lambda s: s["drop"]["rngs"]["count"][...]  # noqa: E731
  assert int(count(enc)) == int(count(init)) < int(count(new))


@pytest.mark.parametrize("rho", [1.0, 0.5])
def test_mixupe_concatenated_pass_starts_at_the_point(rho):
  """MixupE over AMP: [mixed; clean] rows run the layers above the point only (block 2, head)."""
  apply, v = adapters.make_nnx_apply(ResCNN(nnx.Rngs(0, dropout=1)))
  x, y = _batch()
  base = objectives.mixup(policies.mixup(1.0), num_classes=3, point="blocks/1")
  lib.assert_concat_pass_starts_at_point(mixupe.mixupe(amp.amp(base, eps=0.05), rho=rho),
                                         apply, v, x, y, matmuls_above=2)


def test_point_called_twice_runs_whole_model_and_unknown_path_raises():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)), jnp.float32)
  y = jnp.arange(8) % 3
  apply, v = adapters.make_nnx_apply(_Twice(nnx.Rngs(0)))
  assert apply.run_encoder(v, x, None, "shared") is None
  obj = amp.amp(objectives.mixup(policies.mixup(1.0), num_classes=3, point="shared"), eps=0.5)
  got = obj(apply, v, x, y, jax.random.key(1))
  ref = obj(lib.whole_model_passes(apply), v, x, y, jax.random.key(1))
  chex.assert_trees_all_close(got, ref, rtol=1e-6)
  with pytest.raises(ValueError, match=r"attribute paths of this model: \['out', 'shared'\]"):
    apply.run_encoder(v, x, None, "nowhere")
  model = ResCNN(nnx.Rngs(0, dropout=1))
  with pytest.raises(ValueError, match=r"'blocks/7'.*'blocks/0', 'blocks/0/bn'"):
    with hidden.nnx_capture_below(model, "blocks/7"):
      pass


def test_model_restored_on_exit_and_on_error():
  model = ResCNN(nnx.Rngs(0, dropout=1))
  before = [(p, id(n)) for p, n in nnx.iter_graph(model)]
  x, _ = _batch()
  with hidden.nnx_capture_below(model, "blocks/1") as cap:
    assert isinstance(model.blocks[1], hidden._Stand) and model.blocks[1].conv is not None
    model(x)
  assert cap.calls == 1 and len(cap.below) == 3 and cap.state is not None
  with pytest.raises(ValueError, match="did not reach"):
    with hidden.nnx_inject_at(model, "blocks/1", cap.h, cap.below):
      pass
  with pytest.raises(RuntimeError, match="boom"):
    with hidden.nnx_inject_at(model, "blocks/1", cap.h, cap.below):
      raise RuntimeError("boom")
  assert [(p, id(n)) for p, n in nnx.iter_graph(model)] == before


# ---------------------------------------------------------------- FLOPs (XLA cost analysis)


class GuardCNN(nnx.Module):
  """`tests/test_perf_guard.py`'s SmallCNN in NNX: f[B, 32, 32, 3] -> f[B, 10] logits."""

  def __init__(self, rngs: nnx.Rngs):
    self.stem = nnx.Conv(3, 8, (3, 3), (2, 2), rngs=rngs)
    self.convs = nnx.List([nnx.Conv(i, o, (3, 3), rngs=rngs)
                           for i, o in ((8, 32), (32, 64), (64, 64))])
    self.norms = nnx.List([nnx.BatchNorm(c, rngs=rngs) for c in (8, 32, 64, 64)])
    self.classifier = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.norms[0](self.stem(x)))
    for i, (conv, norm) in enumerate(zip(self.convs, list(self.norms)[1:])):
      x = jax.nn.relu(norm(conv(x)))
      if i == 0:
        x = nnx.max_pool(x, (2, 2), (2, 2))
    return self.classifier(jnp.mean(x, axis=(1, 2)))


# Measured (CPU): AMP at the last hidden point ('norms/3') over ERM, train step FLOPs:
# 1.3298 with every lambda pass re-running the whole model, 1.0042 with the split.
AMP_SPLIT_FLOOR = 1.02


def test_amp_at_last_hidden_point_flops_within_floor():
  apply, variables = adapters.make_nnx_apply(GuardCNN(nnx.Rngs(0)))
  x, y = jnp.zeros((64, 32, 32, 3), jnp.float32), jnp.zeros((64,), jnp.int32)
  tx = optax.sgd(0.1, momentum=0.9)
  state = train_step_lib.create_train_state(variables, tx, jax.random.key(1), ema=False)

  def flops(objective, a):
    step = functools.partial(train_step_lib.train_step, objective=objective, apply=a, tx=tx)
    return reference_models.cost(step, state, {"inputs": x, "labels": y})["flops"]

  erm = flops(objectives.erm(num_classes=10), apply)
  obj = amp.amp(objectives.mixup(policies.mixup(1.0), num_classes=10, point="norms/3"))
  fast, whole = flops(obj, apply) / erm, flops(obj, lib.whole_model_passes(apply)) / erm
  print(f"NNX AMP at 'norms/3', FLOPs / ERM: whole-model passes {whole:.4f}, split {fast:.4f}")
  assert whole > 1.2, whole  # The guard has teeth: the former path is visible in the count.
  assert fast <= AMP_SPLIT_FLOOR, (
      f"AMP at a hidden point of an unmodified NNX model costs {fast:.4f}x ERM's FLOPs (floor "
      f"{AMP_SPLIT_FLOOR}): do the lambda passes re-run the layers below the point?")
