"""Objectives: mixup/ERM losses through apply functions, names, sharded equality."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mixjax import adapters, losses, methods, mixing, objectives, pairing, policies, sampling


class Net(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(16, name="hidden")(x.reshape(x.shape[0], -1))
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    x = nn.Dropout(0.2, deterministic=not train)(nn.relu(x))
    return nn.Dense(3, name="head")(x)


def _data(b=16):
  rng = np.random.default_rng(0)
  return rng.normal(size=(b, 2, 3)).astype(np.float32), rng.integers(0, 3, b)


def test_mixup_objective_equals_manual_computation():
  x, y = _data()
  v = Net().init(jax.random.key(0), x)
  obj = objectives.mixup(policies.mixup(0.5), num_classes=3)
  apply = adapters.make_apply(Net(), train=True)
  loss, (state, metrics) = obj(apply, v, x, y, jax.random.key(1))
  k_mix, k_drop = jax.random.split(jax.random.key(1))
  mb = mixing.mix_batch(k_mix, x, y, policy=policies.mixup(0.5), num_classes=3)
  logits, ref_state = Net().apply(v, mb.inputs, train=True, rngs={"dropout": k_drop},
                                  mutable=["batch_stats"])
  ref = losses.softmax_cross_entropy(logits, mb.targets).mean()
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  chex.assert_trees_all_close(state, ref_state)
  assert set(metrics) == {"loss", "lam_mean"}


def test_hidden_point_and_plain_function():
  x, y = _data()
  v = Net().init(jax.random.key(0), x)
  obj = objectives.mixup(policies.mixup(0.5), num_classes=3, point="hidden")
  loss, _ = obj(adapters.make_apply(Net(), train=False), v, x, y, jax.random.key(1))
  assert np.isfinite(loss)
  w = jnp.ones((6, 3)) * 0.1
  f = adapters.make_apply_fn(lambda p, x: x.reshape(x.shape[0], -1) @ p)
  loss_plain, (state, _) = objectives.mixup(policies.mixup(0.5), num_classes=3)(
      f, {"params": w}, x, y, jax.random.key(1))
  assert state == {} and np.isfinite(loss_plain)
  with pytest.raises(ValueError, match="no submodules"):
    obj(f, {"params": w}, x, y, jax.random.key(1))


def test_erm_and_get_objective():
  x, y = _data()
  v = Net().init(jax.random.key(0), x)
  apply = adapters.make_apply(Net(), train=False)
  loss, _ = methods.get_objective("erm", num_classes=3)(apply, v, x, y, jax.random.key(0))
  ref = losses.softmax_cross_entropy(Net().apply(v, x), jax.nn.one_hot(y, 3)).mean()
  np.testing.assert_allclose(loss, ref, rtol=1e-6)
  for m in ["mixup", "untied", "dat"]:
    o = methods.get_objective(m, num_classes=3, alpha=0.4, beta=0.9)
    assert isinstance(o, objectives.Mixup)
  cos = methods.get_objective("mixup", num_classes=3, loss="cosine", cosine_dim=3)
  assert cos.to_logits(jnp.eye(3)).shape == (3, 3)
  for bad in ["cutmix", "mixup+dat", "erm+amp", ""]:
    with pytest.raises(ValueError):
      methods.get_objective(bad, num_classes=3)


def test_sharded_objective_equals_single_device():
  mesh = Mesh(np.array(jax.devices()), ("data",))
  x, y = _data(32)
  v = Net().init(jax.random.key(0), x)
  apply = adapters.make_apply(Net(), train=True)
  kw = dict(num_classes=3, pairing=pairing.random_permutation)
  sharded_obj = objectives.mixup(policies.mixup(1.0), mesh=mesh, **kw)
  grad_fn = lambda o: jax.jit(jax.value_and_grad(  # noqa: E731
      lambda p, x, y: o(apply, {**v, "params": p}, x, y, jax.random.key(3))[0]))
  xs, ys = jax.device_put((x, y), NamedSharding(mesh, P("data")))
  loss_s, g_s = grad_fn(sharded_obj)(v["params"], xs, ys)
  single = objectives.mixup(policies.mixup(1.0), pairing=pairing.grouped(pairing.random_permutation, 8),
                            num_classes=3)
  loss_1, g_1 = grad_fn(single)(v["params"], x, y)
  np.testing.assert_allclose(loss_s, loss_1, rtol=1e-5)
  chex.assert_trees_all_close(g_s, g_1, rtol=1e-4, atol=1e-6)


def test_nnx_model_through_the_same_objectives():
  from flax import nnx

  class NNXNet(nnx.Module):

    def __init__(self, rngs):
      self.hidden = nnx.Linear(6, 16, rngs=rngs)
      self.bn = nnx.BatchNorm(16, rngs=rngs)
      self.drop = nnx.Dropout(0.2, rngs=rngs)
      self.head = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
      x = self.bn(self.hidden(x.reshape(x.shape[0], -1)))
      return self.head(self.drop(jax.nn.relu(x)))

  x, y = _data()
  apply, variables = adapters.make_nnx_apply(NNXNet(nnx.Rngs(0, dropout=1)))
  obj = objectives.mixup(policies.mixup(0.5), num_classes=3, point="hidden")

  @jax.jit
  def step(params):
    (loss, (state, _)), g = jax.value_and_grad(
        lambda p: obj(apply, {**variables, "params": p}, x, y, jax.random.key(1)),
        has_aux=True)(params)
    return loss, state, g

  loss, state, grads = step(variables["params"])
  loss2, _, _ = step(variables["params"])
  assert np.isfinite(loss) and loss == loss2
  assert float(jnp.abs(grads["hidden"]["kernel"][...]).sum()) > 0
  # Batch statistics moved (train mode) and came back as the new model state.
  assert not np.allclose(state["nnx_state"]["bn"]["mean"][...], 0.0)
  # Eval mode: deterministic, statistics untouched.
  eval_apply, _ = adapters.make_nnx_apply(NNXNet(nnx.Rngs(0, dropout=1)), train=False)
  out, st = eval_apply(variables, x)
  np.testing.assert_allclose(st["nnx_state"]["bn"]["mean"][...], 0.0)
  assert out.shape == (16, 3)


def test_hidden_mixing_accepts_token_ids():
  import flax.linen as nn

  class Text(nn.Module):

    @nn.compact
    def __call__(self, tokens, train: bool = False):
      h = nn.Embed(20, 8, name="embed")(tokens)
      return nn.Dense(3)(h.mean(1))

  tokens = jnp.arange(24).reshape(6, 4) % 20
  v = Text().init(jax.random.key(0), tokens)
  obj = objectives.mixup(policies.mixup(1.0), num_classes=3, point="embed")
  loss, _ = obj(adapters.make_apply(Text()), v, tokens, jnp.arange(6) % 3, jax.random.key(1))
  assert np.isfinite(loss)
  with pytest.raises(ValueError, match="int32"):  # Input mixing of token ids is an error.
    objectives.mixup(policies.mixup(1.0), num_classes=3)(
        adapters.make_apply(Text()), v, tokens, jnp.arange(6) % 3, jax.random.key(1))


def test_mixupe_reads_the_policy_first_order_weight():
  from mixjax import amp, mixupe
  base = objectives.mixup(policies.untied_mixup(2.2, 0.9), num_classes=3)
  m = mixupe.mixupe(amp.amp(base))
  assert m.weight == pytest.approx(0.9 / 3.1)  # U(Beta(a, b)): b / (a + b).
  assert (policies.dat(0.4).alpha, policies.dat(0.4).beta) == (0.4, 0.4)
  custom = objectives.mixup(lambda k, b: policies.Coefficients(jnp.ones(b), jnp.ones(b)),
                            num_classes=3)
  with pytest.raises(ValueError, match="alpha"):
    mixupe.mixupe(custom)
  assert mixupe.mixupe(custom, alpha=0.5).weight == sampling.expected_one_minus_lam(0.5)
