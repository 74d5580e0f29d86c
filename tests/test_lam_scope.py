"""Where the mixing coefficient is shared: per example, pair, device, host (and per batch).

References: block structure read from the drawn arrays and their shardings,
timm's `mode='pair'` recomputed in NumPy, scipy KS tests of the shared values
against the policy's distribution. The two-process test runs two local
processes through `jax.distributed` and compares what each drew.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy import stats

import train_testlib as lib
from mixjax import config_utils, from_config, methods, mixing, objectives, pairing, policies

B = 32


def _mesh(n=8):
  return Mesh(np.array(jax.devices()[:n]), ("data",))


@functools.lru_cache(maxsize=None)
def _draw_fn(scope, policy, mesh, batch, pair):
  return jax.jit(lambda k, l: mixing.draw(k, l, batch, policy=policy, pairing=pair,
                                          num_classes=3, mesh=mesh, scope=scope))


def _draw(scope, policy, *, mesh=None, key=0, batch=B, pair=pairing.reverse):
  labels = jnp.arange(batch) % 3
  if mesh is not None:
    labels = jax.device_put(labels, NamedSharding(mesh, P("data")))
  return _draw_fn(scope, policy, mesh, batch, pair)(jax.random.key(key), labels)


def _blocks(values, n):
  """values f[B, ...] -> [n, B/n, ...] contiguous blocks."""
  v = np.asarray(values)
  return v.reshape((n, v.shape[0] // n) + v.shape[1:])


@pytest.mark.parametrize("policy", [policies.mixup(0.4), policies.untied_mixup(0.5, 2.0)])
def test_device_scope_is_constant_within_each_shard_and_differs_across(policy):
  mesh = _mesh()
  d = _draw("device", policy, mesh=mesh)
  for c in (d.coeffs.lam_x, d.coeffs.lam_y):
    assert c.shape == (B,) and c.sharding.spec == P("data")
    blocks = _blocks(c, 8)
    np.testing.assert_array_equal(blocks, np.repeat(blocks[:, :1], B // 8, axis=1))
    assert len(np.unique(blocks[:, 0])) == 8
    for shard in c.addressable_shards:  # Each device holds its own block's value.
      np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(c)[shard.index])


def test_host_scope_is_one_value_per_process():
  """One process here: one value for the batch (the two-process test checks two hosts)."""
  d = _draw("host", policies.mixup(0.4), mesh=_mesh())
  lam = np.asarray(d.coeffs.lam_x)
  assert lam.shape == (B,) and len(np.unique(lam)) == 1
  np.testing.assert_array_equal(mixing.shard_groups("host", _mesh()), np.zeros(8))
  np.testing.assert_array_equal(mixing.shard_groups("device", _mesh()), np.arange(8))


def test_shard_groups_follow_the_batch_axes_of_a_2d_mesh():
  devices = np.array(jax.devices()[:8]).reshape(4, 2)
  mesh = Mesh(devices, ("data", "fsdp"))
  np.testing.assert_array_equal(mixing.shard_groups("device", mesh, ("data", "fsdp")),
                                np.arange(8))
  np.testing.assert_array_equal(mixing.shard_groups("device", mesh, "data"), np.arange(4))
  d = _draw("device", policies.mixup(0.4), mesh=mesh, batch=16)
  assert len(np.unique(np.asarray(d.coeffs.lam_x))) == 4  # 'data' shards; fsdp holds copies.


@pytest.mark.parametrize("batch", [1, 7, 8])
def test_pair_scope_matches_timm_mode_pair(batch):
  """timm `_mix_pair`: lam per pair (i, B-1-i), both examples mixed with it (NumPy)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, 4, 4, 3)).astype(np.float32)
  y = rng.integers(0, 5, batch)
  mb = jax.jit(lambda k: mixing.mix_batch(k, x, y, policy=policies.mixup(0.7), num_classes=5,
                                          pairing=pairing.reverse, scope="pair"))(
                                              jax.random.key(1))
  lam = np.asarray(mb.coeffs.lam_x)
  np.testing.assert_array_equal(lam, lam[::-1])
  half = lam[:batch // 2]  # timm's lam_batch (an odd batch's middle example mixes with itself).
  ref_x, ref_lam = x.copy(), np.ones(batch, np.float32)
  for i in range(batch // 2):
    j = batch - 1 - i
    ref_x[i] = x[i] * half[i] + x[j] * (1 - half[i])
    ref_x[j] = x[j] * half[i] + x[i] * (1 - half[i])
    ref_lam[i] = ref_lam[j] = half[i]
  np.testing.assert_allclose(mb.inputs, ref_x, rtol=1e-5, atol=1e-6)
  t = np.eye(5)[y]
  mid = batch // 2 if batch % 2 else None
  l = lam[:, None]
  np.testing.assert_allclose(mb.targets, l * t + (1 - l) * t[::-1], rtol=1e-5, atol=1e-6)
  if mid is not None:
    np.testing.assert_allclose(mb.inputs[mid], x[mid], rtol=1e-6)
  assert batch == 1 or len(np.unique(half)) == batch // 2


def test_pair_scope_under_a_mesh_pairs_inside_each_shard():
  mesh = _mesh()
  d = _draw("pair", policies.mixup(0.4), mesh=mesh, pair=pairing.reverse)
  lam, perm = np.asarray(d.coeffs.lam_x), np.asarray(d.perm)
  np.testing.assert_array_equal(lam, lam[perm])
  np.testing.assert_array_equal(perm // (B // 8), np.arange(B) // (B // 8))  # Shard-local.


def test_cutmix_masks_are_shared_per_device():
  pol = policies.cutmix(1.0, (6, 6), mixup_alpha=0.5)
  d = _draw("device", pol, mesh=_mesh())
  masks, lam_y = _blocks(d.coeffs.lam_x, 8), _blocks(d.coeffs.lam_y, 8)
  assert masks.shape == (8, B // 8, 6, 6, 1)
  np.testing.assert_array_equal(masks, np.repeat(masks[:, :1], B // 8, axis=1))
  np.testing.assert_array_equal(lam_y, np.repeat(lam_y[:, :1], B // 8, axis=1))


@pytest.mark.parametrize("scope", ["example", "pair", "device", "host"])
def test_shared_values_keep_the_policy_distribution(scope):
  """One value per block, over 60 keys, against Beta(0.4, 0.4) (KS, fixed seeds)."""
  mesh = _mesh()
  draws = []
  for k in range(60):
    d = _draw(scope, policies.mixup(0.4), mesh=mesh, key=k, pair=pairing.reverse)
    lam, perm = np.asarray(d.coeffs.lam_x, np.float64), np.asarray(d.perm)
    first = {"example": np.ones(B, bool), "pair": np.arange(B) <= perm,
             "device": np.arange(B) % (B // 8) == 0, "host": np.arange(B) == 0}[scope]
    draws.append(lam[first])
  sample = np.concatenate(draws)
  assert sample.size == 60 * {"example": B, "pair": B // 2, "device": 8, "host": 1}[scope]
  assert stats.kstest(sample, stats.beta(0.4, 0.4).cdf).pvalue > 1e-3


def test_scope_errors_name_the_cause():
  with pytest.raises(ValueError, match="scope must be one of"):
    objectives.mixup(policies.mixup(0.4), scope="elem")
  with pytest.raises(ValueError, match="per_example=True"):
    objectives.mixup(policies.mixup(0.4, per_example=False), scope="device")
  with pytest.raises(ValueError, match="pairing.reverse"):
    objectives.mixup(policies.mixup(0.4), scope="pair")
  with pytest.raises(ValueError, match="needs the mesh"):
    methods.get_objective("mixup", num_classes=3, lam_scope="device")
  with pytest.raises(ValueError, match="lam_scope must be one of"):
    methods.get_objective("mixup", num_classes=3, lam_scope="elem")
  obj = methods.get_objective("mixup+amp+mixupe", num_classes=3, lam_scope="batch")
  assert not obj.base.base.policy.per_example


def test_config_lam_scope_reaches_the_objective_and_trains():
  c = lib.tiny_config(3)
  c.mesh_data = 8
  c.mix.lam_scope = "device"
  config_utils.validate(c)
  mesh = from_config.mesh(c)
  obj = from_config.objective(c, "mixup+amp", mesh)
  assert obj.base.scope == "device" and obj.base.policy.per_example
  import train
  res = train.train_one(c, "mixup", None, model=lib.TinyResNet(width=4))
  assert res["step"] == 3
  for bad, match in [({"lam_scope": "pair"}, "pairing='reverse'"),
                     ({"lam_scope": "host", "shard_local": False}, "shard_local=True"),
                     ({"lam_scope": "pair", "pairing": "reverse", "k": 3}, "lam_scope='example'")]:
    c2 = lib.tiny_config(2)
    c2.mix.update(bad)
    with pytest.raises(ValueError, match=match):
      config_utils.validate(c2)


def test_two_processes_agree_on_per_batch_and_split_per_host(tmp_path):
  """Two processes x 2 CPU devices: per-batch lam equal everywhere, per-host lam one per process."""
  port = lib.free_port()
  procs = [lib.spawn(["coefficients", str(tmp_path), "--distributed", f"127.0.0.1:{port}", 2, i],
                     env_devices=2) for i in range(2)]
  outs = lib.communicate(procs, timeout=150)
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  got = [json.load(open(os.path.join(tmp_path, f"coefficients_{i}.json"))) for i in range(2)]
  for g in got:
    assert g["collectives"] == {"batch": 0, "host": 0, "device": 0}, g["collectives"]
  assert got[0]["batch"] == got[1]["batch"]  # The same per-batch lam, never communicated.
  host = [np.array(g["host"]) for g in got]  # Rows this process holds (2 devices x 4 rows).
  for h in host:
    assert len(np.unique(h)) == 1
  assert host[0][0] != host[1][0]
  device = np.concatenate([np.array(g["device"]) for g in got]).reshape(4, -1)
  assert len(np.unique(device[:, 0])) == 4 and (device == device[:, :1]).all()
