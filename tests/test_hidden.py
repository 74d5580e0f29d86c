"""Hidden-layer mixing in unmodified linen and NNX models."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixjax import hidden, mixing


class CNN(nn.Module):
  """A model written as in the Flax examples: no mixing hooks anywhere."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(16)(x)
    x = nn.relu(x)
    return nn.Dense(3)(x)


def _setup():
  x = jax.random.normal(jax.random.key(0), (6, 8, 8, 1))
  v = CNN().init(jax.random.key(1), x)
  perm = jnp.array([5, 4, 3, 2, 1, 0])
  lam = jnp.linspace(0.1, 0.9, 6)
  return x, v, perm, lam


def test_module_paths_lists_mixing_points():
  x, v, _, _ = _setup()
  assert hidden.module_paths(CNN(), v, x) == ["Conv_0", "BatchNorm_0", "Dense_0", "Dense_1"]


class MixAtTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_mix_at_dense_equals_split_model(self):
    x, v, perm, lam = _setup()
    p = v["params"]

    def mixed(v, x):
      with hidden.mix_at("Dense_0", lam, perm):
        return CNN().apply(v, x)

    out = self.variant(mixed)(v, x)
    # By hand: run the bottom, mix, run the top.
    h = nn.Conv(8, (3, 3)).apply({"params": p["Conv_0"]}, x)
    h = nn.BatchNorm(use_running_average=True).apply(
        {"params": p["BatchNorm_0"], "batch_stats": v["batch_stats"]["BatchNorm_0"]}, h)
    h = nn.avg_pool(nn.relu(h), (2, 2), (2, 2)).reshape(6, -1)
    h = nn.Dense(16).apply({"params": p["Dense_0"]}, h)
    h = mixing.mix_with_partner(h, perm, lam)
    ref = nn.Dense(3).apply({"params": p["Dense_1"]}, nn.relu(h))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)

  def test_unknown_path_lists_points(self):
    x, v, perm, lam = _setup()
    with pytest.raises(ValueError, match=r"No submodule at path 'layer9'.*Dense_0"):
      with hidden.mix_at("layer9", lam, perm):
        CNN().apply(v, x)


def test_mix_at_with_batch_stats_update():
  x, v, perm, lam = _setup()
  with hidden.mix_at("Conv_0", lam, perm):
    _, state = CNN().apply(v, x, train=True, mutable=["batch_stats"])
  # The BN statistics are those of the mixed conv output.
  h = nn.Conv(8, (3, 3)).apply({"params": v["params"]["Conv_0"]}, x)
  h = mixing.mix_with_partner(h, perm, lam)
  mean = 0.99 * v["batch_stats"]["BatchNorm_0"]["mean"] + 0.01 * h.mean((0, 1, 2))
  np.testing.assert_allclose(state["batch_stats"]["BatchNorm_0"]["mean"], mean, rtol=1e-5, atol=1e-6)


class NNXMLP(nnx.Module):

  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs)])
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = jax.nn.relu(layer(x))
    return self.head(x)


def test_nnx_mix_at_equals_manual_and_restores():
  model = NNXMLP(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (6, 4))
  perm, lam = jnp.array([1, 0, 3, 2, 5, 4]), jnp.full((6,), 0.3)
  with hidden.nnx_mix_at(model, "layers/1", lam, perm):
    out = model(x)
  h = jax.nn.relu(model.layers[0](x))
  h = jax.nn.relu(mixing.mix_with_partner(model.layers[1](h), perm, lam))
  np.testing.assert_allclose(out, model.head(h), rtol=1e-5, atol=1e-6)
  assert isinstance(model.layers[1], nnx.Linear)  # Restored.

  @nnx.jit
  def jitted(m, x):
    with hidden.nnx_mix_at(m, "head", lam, perm):
      return m(x)
  np.testing.assert_allclose(jitted(model, x), mixing.mix_with_partner(model(x), perm, lam),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="no submodule 'nope'"):
    with hidden.nnx_mix_at(model, "nope", lam, perm):
      pass


def test_capture_below_and_inject_at_start_a_pass_at_the_point():
  x, v, perm, lam = _setup()
  with hidden.capture_below("BatchNorm_0") as cap:
    _, state = CNN().apply(v, x, train=True, mutable=["batch_stats"])
  assert cap.calls == 1 and len(cap.below) == 1  # Conv_0 is below the point.
  h_ref = nn.Conv(8, (3, 3)).apply({"params": v["params"]["Conv_0"]}, x)
  np.testing.assert_allclose(cap.below[0], h_ref, rtol=1e-6)
  assert [p for p, _ in cap.variables] == [("Conv_0",), ("BatchNorm_0",)]
  chex.assert_trees_all_close(cap.variables[1][1]["batch_stats"],
                              state["batch_stats"]["BatchNorm_0"])
  # Injected at the point, the pass equals mixing there, and the layers below do not run:
  # the conv's parameters no longer matter.
  h = mixing.mix_with_partner(cap.h, perm, lam)
  broken = {**v, "params": {**v["params"], "Conv_0": jax.tree_util.tree_map(
      lambda a: a + 1.0, v["params"]["Conv_0"])}}
  with hidden.inject_at("BatchNorm_0", h, cap.below):
    out, _ = CNN().apply(broken, x, train=True, mutable=["batch_stats"])
  with hidden.mix_at("BatchNorm_0", lam, perm):
    ref, _ = CNN().apply(v, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(out, ref, rtol=1e-6)
  with pytest.raises(ValueError, match="calls below 'BatchNorm_0'"):
    with hidden.inject_at("BatchNorm_0", h, []):
      CNN().apply(v, x)
