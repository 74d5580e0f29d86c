"""Mixing of pytrees and batches: NumPy references, errors, shard-local mode."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy import stats

import mixjax
from mixjax import checks, losses, mixing, objectives, pairing, policies, sampling


def _batch(b=8, seed=0):
  rng = np.random.default_rng(seed)
  return {
      "image": rng.normal(size=(b, 4, 4, 3)).astype(np.float32),
      "tokens": rng.normal(size=(b, 5, 6)).astype(np.float32),
  }, rng.integers(0, 3, b)


class MixTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_per_example_lam_broadcasts_over_every_leaf(self):
    x, _ = _batch()
    perm = np.array([3, 2, 1, 0, 7, 6, 5, 4])
    lam = np.linspace(0, 1, 8).astype(np.float32)
    out = self.variant(mixing.mix_with_partner)(x, perm, lam)
    for k in x:
      l = lam.reshape((8,) + (1,) * (x[k].ndim - 1))
      np.testing.assert_allclose(out[k], l * x[k] + (1 - l) * x[k][perm], rtol=1e-6, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_scalar_lam_and_dtype_kept(self):
    x = jnp.arange(24, dtype=jnp.bfloat16).reshape(4, 6)
    out = self.variant(mixing.mix)(x, x[::-1], 0.25)
    assert out.dtype == jnp.bfloat16
    ref = 0.25 * np.asarray(x, np.float32) + 0.75 * np.asarray(x, np.float32)[::-1]
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=1e-2)

  @chex.variants(with_jit=True, without_jit=True)
  def test_mix_batch_against_numpy(self):
    x, y = _batch()
    f = self.variant(lambda k, x, y: mixing.mix_batch(
        k, x, y, policy=policies.untied_mixup(2.2, 0.9), num_classes=3, label_smoothing=0.1))
    mb = f(jax.random.key(4), x, y)
    perm, lx, ly = (np.asarray(v) for v in (mb.perm, mb.coeffs.lam_x, mb.coeffs.lam_y))
    t = np.eye(3)[y] * 0.9 + 0.1 / 3
    chex.assert_shape(mb.targets, (8, 3))
    np.testing.assert_allclose(mb.targets, ly[:, None] * t + (1 - ly[:, None]) * t[perm], rtol=1e-5)
    np.testing.assert_allclose(mb.targets_b, t[perm], rtol=1e-6)
    li = lx.reshape(8, 1, 1, 1)
    np.testing.assert_allclose(mb.inputs["image"], li * x["image"] + (1 - li) * x["image"][perm],
                               rtol=1e-5, atol=1e-6)
    # Same key, same bits.
    mb2 = f(jax.random.key(4), x, y)
    chex.assert_trees_all_equal(mb, mb2)


def test_soft_and_onehot_labels():
  x, y = _batch()
  onehot = np.eye(3, dtype=np.float32)[y]
  a = mixing.mix_batch(jax.random.key(0), x, y, policy=policies.mixup(1.0), num_classes=3)
  b = mixing.mix_batch(jax.random.key(0), x, onehot, policy=policies.mixup(1.0))
  chex.assert_trees_all_close(a, b)


def test_dat_keeps_own_label_and_erm_is_identity():
  x, y = _batch()
  mb = mixing.mix_batch(jax.random.key(0), x, y, policy=policies.dat(1.0), num_classes=3)
  np.testing.assert_array_equal(mb.targets, np.eye(3)[y])
  mb = mixing.mix_batch(jax.random.key(0), x, y, policy=policies.erm(), num_classes=3)
  chex.assert_trees_all_close(mb.inputs, x)


def test_per_batch_lam():
  x, y = _batch()
  mb = mixing.mix_batch(jax.random.key(0), x, y, policy=policies.mixup(0.4, per_example=False),
                        num_classes=3)
  assert mb.coeffs.lam_x.shape == ()


def test_weighted_any_gamma():
  pol = policies.weighted(policies.mixup(1.0), lambda l: l ** 2)
  c = pol(jax.random.key(0), 16)
  np.testing.assert_allclose(c.lam_y, np.asarray(c.lam_x) ** 2, rtol=1e-6)


def test_dirichlet_k_way():
  x, y = _batch()
  xm, tm = mixing.mix_dirichlet(jax.random.key(0), x["image"], y, alpha=1.0, k=3, num_classes=3)
  np.testing.assert_allclose(np.sum(tm, -1), 1.0, rtol=1e-5)
  assert xm.shape == x["image"].shape
  # Reference: recompute weights and permutations from the same key.
  k_w, k_p = jax.random.split(jax.random.key(0))
  w = np.asarray(mixjax.sample_dirichlet(k_w, 1.0, 3, (8,)))
  perms = [np.arange(8)] + [np.asarray(jax.random.permutation(k, 8)) for k in jax.random.split(k_p, 2)]
  ref = sum(w[:, m, None, None, None] * x["image"][perms[m]] for m in range(3))
  np.testing.assert_allclose(xm, ref, rtol=1e-5, atol=1e-6)


# ---- bad input -------------------------------------------------------------

def test_integer_images_rejected():
  x = np.zeros((4, 2, 2, 3), np.uint8)
  with pytest.raises(ValueError, match="inputs.*uint8.*astype"):
    mixing.mix_batch(jax.random.key(0), x, np.zeros(4, int), policy=policies.mixup(1.0),
                     num_classes=2)
  with pytest.raises(ValueError, match="uint8"):
    mixing.mix_with_partner({"img": x}, np.arange(4), 0.5)


def test_batch_mismatch_rejected():
  x, _ = _batch(8)
  with pytest.raises(ValueError, match="labels have batch size 5 but inputs have 8"):
    mixing.mix_batch(jax.random.key(0), x, np.zeros(5, int), policy=policies.mixup(1.0),
                     num_classes=2)
  with pytest.raises(ValueError, match="different batch sizes"):
    mixing.mix({"a": np.ones((2, 3)), "b": np.ones((3, 3))},
               {"a": np.ones((2, 3)), "b": np.ones((3, 3))}, 0.5)
  with pytest.raises(ValueError, match="lam must be"):
    mixing.mix(np.ones((4, 2)), np.ones((4, 2)), np.ones(3) * 0.5)


@pytest.mark.parametrize("lam", [np.nan, -0.1, 1.5, np.array([0.5, np.nan, 0.2, 0.1])])
def test_bad_lam_rejected(lam):
  with pytest.raises(ValueError, match=r"lam must lie in \[0, 1\]"):
    mixing.mix(np.ones((4, 2)), np.zeros((4, 2)), lam)


def _mix_lam(lam):
  return mixing.mix(jnp.ones((4, 2)), jnp.zeros((4, 2)), lam)


_NAN_LAM = jnp.array([0.5, jnp.nan, 0.1, 0.2])


def test_traced_lam_checked_with_checkify():
  for checked in (checks.checked(jax.jit(_mix_lam)), jax.jit(checks.checked(_mix_lam))):
    err, _ = checked(_NAN_LAM)
    with pytest.raises(Exception, match=r"lam must lie in \[0, 1\]"):
      err.throw()
    err, out = checked(jnp.full((4,), 0.25))
    err.throw()  # No error for valid values.
    np.testing.assert_allclose(out, 0.25)


@pytest.mark.parametrize("checked_first", [False, True])
def test_traced_checks_do_not_depend_on_call_order(checked_first):
  """A plain and a checked call of one jitted function (one trace cache), in either order."""
  fn = jax.jit(_mix_lam)
  if checked_first:
    err, checked_out = checks.checked(fn)(_NAN_LAM)
    plain = fn(_NAN_LAM)  # Before the fix: "not functionalized".
  else:
    plain = fn(_NAN_LAM)
    err, checked_out = checks.checked(fn)(_NAN_LAM)  # Before the fix: no error.
  expected = np.repeat(np.asarray(_NAN_LAM)[:, None], 2, axis=1)  # lam * 1 + (1 - lam) * 0.
  np.testing.assert_array_equal(plain, expected)  # Unchecked: NaN flows through, no error.
  np.testing.assert_array_equal(checked_out, expected)
  with pytest.raises(Exception, match=r"lam must lie in \[0, 1\]"):
    err.throw()
  np.testing.assert_array_equal(fn(_NAN_LAM), expected)  # Plain again, after both.


def test_bad_policy_args():
  with pytest.raises(ValueError, match="alpha"):
    policies.mixup(0.0)
  with pytest.raises(ValueError, match="alpha"):
    policies.dat(-1.0)
  with pytest.raises(ValueError, match="gamma must map"):
    policies.weighted(policies.mixup(1.0), lambda l: 2 * l)
  with pytest.raises(ValueError, match="gamma must map"):
    policies.weighted(policies.mixup(1.0), lambda l: jnp.log(l - 0.5))
  with pytest.raises(ValueError, match="Unknown policy"):
    policies.get_policy("cutmix")
  with pytest.raises(ValueError, match="num_classes"):
    mixing.to_targets(np.zeros(3, int))
  with pytest.raises(ValueError, match="label_smoothing"):
    mixing.to_targets(np.zeros(3, int), 3, label_smoothing=1.0)


# ---- shard-local mixing on 8 devices --------------------------------------

_COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce", "reduce-scatter")


def test_shard_local_has_no_collectives_and_matches_single_device():
  assert jax.device_count() == 8
  mesh = Mesh(np.array(jax.devices()), ("data",))
  x, y = _batch(32, seed=1)
  sharded = jax.device_put((x, y), NamedSharding(mesh, P("data")))

  def fn(key, x, y, m):
    return mixing.mix_batch(key, x, y, policy=policies.mixup(0.4), num_classes=3,
                            pairing=pairing.random_permutation, mesh=m)

  jitted = jax.jit(lambda k, x, y: fn(k, x, y, mesh))
  hlo = jitted.lower(jax.random.key(0), *sharded).compile().as_text()
  found = [c for c in _COLLECTIVES if c in hlo]
  assert not found, f"shard-local mixing compiled with collectives {found}"
  out = jitted(jax.random.key(0), *sharded)
  assert out.inputs["image"].sharding.spec == P("data")

  # The single-device computation with the same grouped pairing gives the same numbers.
  ref = mixing.mix_batch(jax.random.key(0), x, y, policy=policies.mixup(0.4), num_classes=3,
                         pairing=pairing.grouped(pairing.random_permutation, 8))
  chex.assert_trees_all_close(jax.device_get(out), ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out.perm) // 4, np.arange(32) // 4)


def test_global_permutation_needs_collectives():
  # The contrast case: pairing by a global permutation moves data across devices.
  mesh = Mesh(np.array(jax.devices()), ("data",))
  x, y = _batch(32, seed=1)
  sharded = jax.device_put((x, y), NamedSharding(mesh, P("data")))
  jitted = jax.jit(lambda k, x, y: mixing.mix_batch(k, x, y, policy=policies.mixup(0.4),
                                                    num_classes=3))
  hlo = jitted.lower(jax.random.key(0), *sharded).compile().as_text()
  assert any(c in hlo for c in _COLLECTIVES)


def test_float64_inputs_mix_in_float64():
  with jax.enable_x64(True):
    a = jnp.full((2, 3), 1.0 + 1e-12, jnp.float64)
    out = mixing.mix(a, jnp.ones((2, 3), jnp.float64), jnp.array([0.5, 1.0], jnp.float64))
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(out)[1], 1.0 + 1e-12, rtol=0, atol=1e-15)


def test_bad_inputs_are_named_not_broadcast():
  x, y = _batch()
  with pytest.raises(ValueError, match="labels must be class ids"):
    mixing.to_targets(jnp.array([0, 3, 1]), 3)
  with pytest.raises(ValueError, match="labels must be class ids"):
    mixing.mix_batch(jax.random.key(0), x, jnp.asarray(y).at[0].set(-1), policy=policies.mixup(1.0),
                     num_classes=3)
  with pytest.raises(ValueError, match="perm must hold partner indices"):
    mixing.mix_with_partner(x, jnp.arange(x["image"].shape[0]) + 1, 0.5)
  with pytest.raises(ValueError, match="perm must be int"):
    mixing.mix_with_partner(x, jnp.zeros(x["image"].shape[0]), 0.5)
  a = jnp.ones((8, 3))
  with pytest.raises(ValueError, match="must match"):
    mixing.mix(a, a[:1], 0.5)
  with pytest.raises(ValueError, match="do not match"):
    losses.softmax_cross_entropy(jnp.zeros((4, 3)), jnp.zeros((4, 1)))
  with pytest.raises(ValueError, match="must be float"):
    losses.softmax_cross_entropy(jnp.zeros((3, 3)), jnp.arange(3))
  t = jnp.eye(3)
  with pytest.raises(ValueError, match="lam"):
    losses.mixup_loss(losses.softmax_cross_entropy, jnp.zeros((3, 3)), t, t, 1.5)
  with pytest.raises(ValueError, match="lam"):
    sampling.untied_gamma(jnp.array([0.5, 1.2]), 2.0, 1.0)


# ---- any batch size ---------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 3, 7])
def test_every_pairing_mixes_odd_batches_and_batch_one(batch):
  x, y = _batch(batch, seed=batch)
  x = {"image": x["image"]}  # A CutMix mask f32[B, 4, 4, 1] mixes images only.
  for name in ("reverse", "roll", "random", "same_class"):
    for pol in (policies.mixup(0.5), policies.cutmix(1.0, (4, 4), mixup_alpha=0.5)):
      mb = mixing.mix_batch(jax.random.key(batch), x, y, policy=pol, num_classes=3,
                            pairing=pairing.get_pairing(name))
      perm = np.asarray(mb.perm)
      assert perm.shape == (batch,) and np.all((perm >= 0) & (perm < batch)), name
      if name != "same_class":
        assert sorted(perm) == list(range(batch)), name  # A permutation.
      lx = np.asarray(mb.coeffs.lam_x)
      li = lx.reshape(lx.shape + (1,) * (4 - lx.ndim)) if lx.ndim < 4 else lx
      np.testing.assert_allclose(mb.inputs["image"],
                                 li * x["image"] + (1 - li) * x["image"][perm], atol=1e-5)
      if batch == 1:  # The only partner is the example itself: nothing changes.
        chex.assert_trees_all_close(mb.inputs, x, atol=1e-6)
        np.testing.assert_allclose(mb.targets, np.eye(3)[y], atol=1e-6)


def test_shard_local_batch_of_one_per_shard_is_the_identity():
  """A shard holding one example can only pair it with itself: mixing is the identity."""
  mesh = Mesh(np.array(jax.devices()), ("data",))
  x, y = _batch(8, seed=2)
  mb = jax.jit(lambda k, x, y: mixing.mix_batch(k, x, y, policy=policies.mixup(1.0),
                                                num_classes=3, mesh=mesh))(
      jax.random.key(0), *jax.device_put((x, y), NamedSharding(mesh, P("data"))))
  np.testing.assert_array_equal(mb.perm, np.arange(8))
  chex.assert_trees_all_close(jax.device_get(mb.inputs), x, atol=1e-6)
  np.testing.assert_allclose(mb.targets, np.eye(3)[y], atol=1e-6)


# ---- k-way Dirichlet mixing -------------------------------------------------

def test_draw_dirichlet_weights_and_partners():
  alpha, k, n = 0.6, 3, 3000
  w, perms = mixing.draw_dirichlet(jax.random.key(0), n, alpha=alpha, k=k)
  w = np.asarray(w, np.float64)
  np.testing.assert_allclose(w.sum(1), 1, atol=1e-5)
  assert stats.kstest(w[:, 0], stats.beta(alpha, (k - 1) * alpha).cdf).pvalue > 1e-3
  np.testing.assert_array_equal(perms[0], np.arange(n))
  for p in np.asarray(perms[1:]):
    assert sorted(p) == list(range(n))
  ws, _ = mixing.draw_dirichlet(jax.random.key(1), n, alpha=alpha, k=k, largest_first=True)
  ws = np.asarray(ws, np.float64)
  assert np.all(np.diff(ws, axis=1) <= 0)  # The example itself has the largest weight.
  ref = np.random.default_rng(0).dirichlet(alpha * np.ones(k), n).max(1)
  assert stats.ks_2samp(ws[:, 0], ref).pvalue > 1e-3
  with pytest.raises(ValueError, match="k .* >= 2"):
    mixing.draw_dirichlet(jax.random.key(0), 4, alpha=1.0, k=1)


@pytest.mark.parametrize("batch", [1, 3])
def test_mix_dirichlet_and_the_k_way_objective_against_numpy(batch):
  from mixjax import adapters, methods
  x, y = _batch(batch, seed=3)
  x = x["image"].reshape(batch, -1)
  xm, tm = mixing.mix_dirichlet(jax.random.key(2), x, y, alpha=1.0, k=3, num_classes=3,
                                label_smoothing=0.1, largest_first=True)
  w, perms = (np.asarray(v) for v in mixing.draw_dirichlet(jax.random.key(2), batch, alpha=1.0,
                                                           k=3, largest_first=True))
  t = np.eye(3)[y] * 0.9 + 0.1 / 3
  np.testing.assert_allclose(xm, sum(w[:, m, None] * x[perms[m]] for m in range(3)), atol=1e-5)
  np.testing.assert_allclose(tm, sum(w[:, m, None] * t[perms[m]] for m in range(3)), atol=1e-6)

  obj = methods.get_objective("mixup", num_classes=3, k=3, label_smoothing=0.1,
                              largest_first=True)
  assert isinstance(obj, objectives.Dirichlet) and not obj.mixes
  proj = np.random.default_rng(0).normal(size=(x.shape[1], 3)).astype(np.float32)
  apply = adapters.make_apply_fn(lambda p, x: x @ p)
  loss, _ = obj(apply, {"params": proj}, x, y, jax.random.key(4))
  d = obj.prepare(apply, {"params": proj}, x, y, jax.random.key(4)).draw
  w, perms = np.asarray(d.coeffs.lam_x), np.asarray(d.perm)
  z = sum(w[:, m, None] * x[perms[m]] for m in range(3)) @ proj
  tt = sum(w[:, m, None] * t[perms[m]] for m in range(3))
  logp = z - z.max(1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(1, keepdims=True))
  np.testing.assert_allclose(loss, -(tt * logp).sum(1).mean(), rtol=1e-4)
  with pytest.raises(ValueError, match="k=3"):
    methods.get_objective("mixup+amp", num_classes=3, k=3)


def test_a_factory_or_an_integer_key_is_named():
  x, y = _batch()
  with pytest.raises(ValueError, match=r"factory policies.mixup; .*policies.mixup\(alpha\)"):
    mixing.mix_batch(jax.random.key(0), x, y, policy=policies.mixup, num_classes=3)
  with pytest.raises(ValueError, match="factory policies.untied_mixup"):
    objectives.mixup(policies.untied_mixup, num_classes=3)
  with pytest.raises(ValueError, match="key must be a PRNG key"):
    mixing.mix_batch(0, x, y, policy=policies.mixup(1.0), num_classes=3)
  raw = jax.random.PRNGKey(0)  # Raw uint32[2] keys are keys too.
  assert mixing.mix_batch(raw, x, y, policy=policies.mixup(1.0), num_classes=3).perm.shape == (8,)
