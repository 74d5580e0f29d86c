"""The ('data', 'fsdp') mesh: shardings, shard-local mixing over both axes, FSDP training.

Runs on the 8 simulated CPU devices of conftest.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import train
import train_testlib as lib
from mixjax import mixing
from mixjax import pairing
from mixjax import sharding


def test_make_mesh_shapes_and_errors():
  assert len(jax.devices()) == 8
  assert dict(sharding.make_mesh().shape) == {"data": 8, "fsdp": 1}
  assert dict(sharding.make_mesh(-1, 4).shape) == {"data": 2, "fsdp": 4}
  assert dict(sharding.make_mesh(1, 2).shape) == {"data": 1, "fsdp": 2}
  assert sharding.num_batch_shards(sharding.make_mesh(2, 2)) == 4
  with pytest.raises(ValueError, match="fsdp=3 must be a positive divisor of the 8"):
    sharding.make_mesh(-1, 3)
  with pytest.raises(ValueError, match="needs 16 devices; 8 are available"):
    sharding.make_mesh(4, 4)


def test_fsdp_spec_splits_the_largest_divisible_dimension():
  assert sharding.fsdp_spec((3, 3, 64, 128), 4) == P(None, None, None, "fsdp")
  assert sharding.fsdp_spec((4096, 1000), 8) == P("fsdp", None)  # 1000 = 8 * 125 but 4096 larger.
  assert sharding.fsdp_spec((4097, 1000), 8) == P(None, "fsdp")  # Largest not divisible.
  assert sharding.fsdp_spec((4097, 1001), 8) == P()
  assert sharding.fsdp_spec((768,), 4) == P()                    # Small: replicated.
  assert sharding.fsdp_spec((3, 3, 64, 128), 1) == P()
  key = jax.eval_shape(lambda: jax.random.key(0))
  mesh = sharding.make_mesh(-1, 4)
  out = sharding.state_shardings(mesh, {"k": key, "w": jnp.zeros((256, 256)), "s": 0})
  # Ties go to the later dimension (output features).
  assert out["k"].spec == P() and out["s"].spec == P() and out["w"].spec == P(None, "fsdp")


def test_shard_local_pairing_over_both_axes_equals_grouped_pairing():
  mesh = sharding.make_mesh(-1, 2)
  labels = jnp.arange(32) % 5
  got = jax.jit(lambda y: mixing.pair(jax.random.key(3), y, pairing.random_permutation,
                                      mesh=mesh, axis_name=sharding.batch_axes(mesh)))(
      jax.device_put(labels, sharding.batch_sharding(mesh)))
  want = pairing.grouped(pairing.random_permutation, 8)(jax.random.key(3), labels, 32)
  np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match="not an axis"):
    mixing.pair(jax.random.key(0), labels, pairing.random_permutation, mesh=mesh,
                axis_name=("data", "model"))


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """Runs of the same config (a full run and its interrupted twin) compile once."""
  with lib.compilation_cache(str(tmp_path_factory.mktemp("jax_cache"))) as path:
    yield path


def _run(config, workdir=None, max_steps=None):
  (res,) = train.train_and_evaluate(config, workdir, model=lib.TinyResNet(width=64),
                                    max_steps=max_steps)
  return res


def test_fsdp_training_matches_one_device_and_shards_the_state():
  c = lib.tiny_config(steps=4)
  c.optimizer.name, c.optimizer.lr = "adamw", 1e-3
  c.mix.shard_local = False  # Global pairing: the same pairs on any mesh.
  one = _run(c)
  c.mesh_data, c.mesh_fsdp = -1, 4
  fsdp = _run(c)
  state = fsdp["state"]
  conv = state.params["Conv_1"]["kernel"]  # 3x3x64x64: split over the 4 'fsdp' devices.
  assert conv.sharding.spec == P(None, None, None, "fsdp")
  assert conv.addressable_shards[0].data.shape == (3, 3, 64, 16)
  opt = [x for x in jax.tree_util.tree_leaves(state.opt_state) if x.shape == conv.shape]
  # Adam's mu and nu of Conv_1 and Conv_2 (both 3x3x64x64).
  assert len(opt) == 4 and all(x.sharding.spec == conv.sharding.spec for x in opt)
  assert state.ema_params["Conv_1"]["kernel"].sharding.spec == conv.sharding.spec
  assert state.params["Dense_0"]["bias"].sharding.spec == P()
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5),
                         jax.device_get(one["state"].params), jax.device_get(state.params))
  np.testing.assert_allclose(one["eval"]["loss"], fsdp["eval"]["loss"], rtol=1e-4)


def test_fsdp_checkpoint_resumes_on_another_mesh(tmp_path):
  c = lib.tiny_config(steps=4)
  c.mesh_data, c.mesh_fsdp = -1, 4
  c.checkpoint_every_steps = 2
  full = _run(c, str(tmp_path / "full"))
  _run(c, str(tmp_path / "resumed"), max_steps=2)
  c.mesh_data, c.mesh_fsdp = -1, 1  # Resume the step-2 checkpoint on a replicated mesh.
  resumed = _run(c, str(tmp_path / "resumed"))
  assert resumed["state"].params["Conv_1"]["kernel"].sharding.spec == P()
  np.testing.assert_allclose(lib.train_losses(str(tmp_path / "full"))[4],
                             lib.train_losses(str(tmp_path / "resumed"))[4], rtol=1e-5)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                         jax.device_get(full["state"].params),
                         jax.device_get(resumed["state"].params))


def test_amp_and_mixupe_give_the_same_run_with_and_without_fsdp():
  # Both meshes split the batch into 8 shards: the same shard-local pairs and clean subsets.
  c = lib.tiny_config(steps=3, method="untied+amp+mixupe")
  c.mixupe.rho = 0.5
  c.mesh_data = -1
  plain = _run(c)
  c.mesh_fsdp = 2
  fsdp = _run(c)
  assert fsdp["state"].params["Conv_1"]["kernel"].sharding.spec == P(None, None, None, "fsdp")
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5),
                         jax.device_get(plain["state"].params), jax.device_get(fsdp["state"].params))
  for k in ("loss", "amp_mask_frac", "mixupe_r"):
    np.testing.assert_allclose(plain["train"][k], fsdp["train"][k], rtol=1e-4)


def test_prefetch_to_device_keeps_order_and_runs_ahead():
  mesh = sharding.make_mesh()
  pulled = []

  def source():
    for i in range(5):
      pulled.append(i)
      yield {"inputs": np.full((8, 2), i, np.float32)}

  it = sharding.prefetch_to_device(source(), sharding.batch_sharding(mesh), size=2)
  first = next(it)
  assert pulled == [0, 1, 2]  # Two batches already on their way to the devices.
  assert first["inputs"].sharding.spec == sharding.batch_sharding(mesh).spec
  assert len(first["inputs"].addressable_shards) == 8
  rest = [float(b["inputs"][0, 0]) for b in it]
  assert [float(first["inputs"][0, 0])] + rest == [0, 1, 2, 3, 4]
