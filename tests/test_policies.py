"""Policies as data: pytree structure, validation, jit, one compilation per sweep."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixjax import checks, mixing, policies, sampling

KEY = jax.random.key(0)
BETA_POLICIES = {
    "mixup": lambda a: policies.mixup(a),
    "mixup_per_batch": lambda a: policies.mixup(a, 0.7, per_example=False),
    "untied": lambda a: policies.untied_mixup(a, 0.9),
    "dat": lambda a: policies.dat(a),
    "weighted": lambda a: policies.weighted(policies.mixup(a), jnp.square),
}


def _assert_coeffs_equal(c, d, untied=False):
  if untied:
    # Within an ulp: XLA fuses `1 - lam` of the flip differently under jit (as
    # before policies were data), and alpha - beta is taken in float64 eagerly,
    # in float32 when traced.
    np.testing.assert_allclose(np.asarray(c.lam_x), np.asarray(d.lam_x), rtol=0, atol=1.2e-7)
    np.testing.assert_allclose(np.asarray(c.lam_y), np.asarray(d.lam_y), rtol=0, atol=1.2e-7)
  else:
    np.testing.assert_array_equal(np.asarray(c.lam_x), np.asarray(d.lam_x))
    np.testing.assert_array_equal(np.asarray(c.lam_y), np.asarray(d.lam_y))


# ---- data: pytree leaves, static structure, .alpha/.beta ------------------------------------

def test_alpha_and_beta_are_leaves_and_settings_are_static():
  pol = policies.weighted(policies.mixup(0.3, 0.5), jnp.square)
  paths = jax.tree_util.tree_flatten_with_path(pol)[0]
  assert [(jax.tree_util.keystr(p), v) for p, v in paths] == [(".policy.alpha", 0.3),
                                                              (".policy.beta", 0.5)]
  assert jax.tree.leaves(policies.erm()) == []
  assert jax.tree.leaves(policies.untied_mixup(2.2, 0.9, False)) == [2.2, 0.9]
  # per_example and gamma are part of the structure, alpha is not.
  assert (jax.tree.structure(policies.mixup(0.2)) == jax.tree.structure(policies.mixup(1.0)))
  assert (jax.tree.structure(policies.mixup(0.2)) !=
          jax.tree.structure(policies.mixup(0.2, per_example=False)))
  assert (jax.tree.structure(policies.weighted(policies.mixup(1.0), jnp.square)) !=
          jax.tree.structure(policies.weighted(policies.mixup(1.0), jnp.sqrt)))


def test_beta_policies_expose_resolved_alpha_and_beta():
  assert (policies.mixup(0.4).alpha, policies.mixup(0.4).beta) == (0.4, 0.4)
  assert (policies.mixup(1, 2).alpha, policies.mixup(1, 2).beta) == (1.0, 2.0)
  assert isinstance(policies.mixup(1).alpha, float)
  assert (policies.untied_mixup(2.2, 0.9).alpha, policies.untied_mixup(2.2, 0.9).beta) == (2.2, 0.9)
  assert (policies.dat(0.4).alpha, policies.dat(0.4).beta) == (0.4, 0.4)
  w = policies.weighted(policies.mixup(0.3, 0.5), jnp.square)
  assert (w.alpha, w.beta) == (0.3, 0.5)
  assert (policies.mixup(jnp.float32(0.5)).alpha, policies.mixup(np.float64(0.5)).beta) == (0.5, 0.5)
  for pol in (policies.erm(), policies.weighted(policies.erm(), jnp.square)):
    assert getattr(pol, "alpha", None) is None and getattr(pol, "beta", None) is None
  for pol in (policies.mixup(0.4), policies.dat(0.4), policies.untied_mixup(2.2, 0.9)):
    assert not hasattr(pol, "beta_params")


def test_equal_values_are_equal_and_hash_equal():
  assert policies.mixup(0.2) == policies.mixup(0.2, 0.2) == policies.Mixup(0.2)
  assert hash(policies.dat(0.4)) == hash(policies.Dat(0.4, 0.4))
  assert policies.mixup(0.2) != policies.mixup(0.3)
  assert policies.mixup(0.2) != policies.dat(0.2)
  assert policies.get_policy("untied", alpha=2.2, beta=0.9) == policies.UntiedMixup(2.2, 0.9)
  assert policies.get_policy("erm") == policies.Erm()


def test_repr_names_the_values():
  assert repr(policies.mixup(0.2)) == "Mixup(alpha=0.2, beta=0.2, per_example=True)"


@pytest.mark.parametrize("factory,args,match", [
    (policies.mixup, (0.0,), "alpha must be a finite number > 0"),
    (policies.mixup, (float("nan"),), "alpha must be a finite number > 0"),
    (policies.mixup, ("x",), "alpha must be a number > 0"),
    (policies.mixup, (1.0, -2.0), "beta must be a finite number > 0"),
    (policies.dat, (-1.0,), "alpha must"),
    (policies.dat, (1.0, float("inf")), "beta must"),
    (policies.untied_mixup, (0.0, 1.0), "alpha must"),
    (policies.untied_mixup, (1.0, 0.0), "beta must"),
    (policies.untied_mixup, (1.0, None), "needs beta"),
    (policies.get_policy, ("cutmix",), "Unknown policy"),
])
def test_bad_args_raise_naming_the_argument(factory, args, match):
  with pytest.raises(ValueError, match=match):
    factory(*args)


def test_bad_gamma_raises_when_built():
  with pytest.raises(ValueError, match="gamma must be a callable"):
    policies.weighted(policies.mixup(1.0), 0.5)
  with pytest.raises(ValueError, match="gamma must map"):
    policies.weighted(policies.mixup(1.0), lambda l: 2 * l)
  with pytest.raises(ValueError, match="gamma must map"):  # Checked under jit too.
    jax.jit(lambda k: policies.weighted(policies.mixup(1.0), lambda l: l - 1)(k, 4))(KEY)


def test_coefficient_shapes_and_values():
  c = policies.erm()(KEY, 5)
  assert c.lam_x.shape == (5,) and np.all(np.asarray(c.lam_x) == 1) and np.all(np.asarray(c.lam_y) == 1)
  c = policies.mixup(0.4)(KEY, 16)
  assert c.lam_x.shape == (16,) and c.lam_x.dtype == jnp.float32
  np.testing.assert_array_equal(c.lam_x, c.lam_y)
  np.testing.assert_array_equal(c.lam_x, sampling.sample_beta(KEY, 0.4, None, (16,)))
  c = policies.mixup(0.4, per_example=False)(KEY, 16)
  assert c.lam_x.shape == () and c.lam_y.shape == ()
  c = policies.dat(0.4)(KEY, 16)
  np.testing.assert_array_equal(c.lam_x, sampling.sample_beta(KEY, 0.4, None, (16,)))
  np.testing.assert_array_equal(c.lam_y, np.ones(16, np.float32))
  assert policies.dat(0.4, per_example=False)(KEY, 16).lam_y.shape == ()
  c = policies.untied_mixup(2.2, 0.9)(KEY, 16)
  np.testing.assert_array_equal(c.lam_x, sampling.sample_untied(KEY, 2.2, 0.9, (16,)))
  np.testing.assert_array_equal(c.lam_y, sampling.untied_gamma(c.lam_x, 2.2, 0.9))
  c = policies.weighted(policies.untied_mixup(2.2, 0.9, False), jnp.square)(KEY, 16)
  assert c.lam_x.shape == ()
  np.testing.assert_allclose(c.lam_y, np.asarray(c.lam_x) ** 2, rtol=1e-6)


# ---- jit: built under jit, traced parameters, one compilation per sweep ----------------------

@pytest.mark.parametrize("name", sorted(BETA_POLICIES))
def test_built_and_called_under_jit(name):
  make = BETA_POLICIES[name]
  jitted = jax.jit(lambda k: make(0.8)(k, 8))(KEY)
  _assert_coeffs_equal(jitted, make(0.8)(KEY, 8), untied=name == "untied")


def test_dat_and_erm_built_under_jit():
  c = jax.jit(lambda k: policies.dat(1.0)(k, 8))(KEY)
  _assert_coeffs_equal(c, policies.dat(1.0)(KEY, 8))
  c = jax.jit(lambda k: policies.erm()(k, 8))(KEY)
  np.testing.assert_array_equal(c.lam_y, np.ones(8))


@pytest.mark.parametrize("name", sorted(BETA_POLICIES))
def test_built_with_traced_alpha(name):
  make = BETA_POLICIES[name]
  traced = jax.jit(lambda a, k: make(a)(k, 8))(2.2, KEY)
  _assert_coeffs_equal(traced, make(2.2)(KEY, 8), untied=name == "untied")


def test_gamma_closing_over_a_traced_value():
  def draw(t, k):
    return policies.weighted(policies.mixup(1.0), lambda l: l ** t)(k, 8)
  c = jax.jit(draw)(2.0, KEY)
  np.testing.assert_allclose(c.lam_y, np.asarray(c.lam_x) ** 2, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(BETA_POLICIES))
def test_alpha_sweep_compiles_once(name):
  make = BETA_POLICIES[name]
  f = jax.jit(lambda pol, key: pol(key, 8))
  for alpha in (0.2, 0.4, 1.0):
    _assert_coeffs_equal(f(make(alpha), KEY), make(alpha)(KEY, 8), untied=name == "untied")
  assert f._cache_size() == 1
  f(policies.erm(), KEY)  # A new structure is a new program.
  assert f._cache_size() == 2


def test_mix_batch_alpha_sweep_compiles_once():
  x = jax.random.normal(jax.random.key(1), (8, 4, 3))
  y = jnp.arange(8) % 3
  f = jax.jit(lambda pol, key, x, y: mixing.mix_batch(key, x, y, policy=pol, num_classes=3))
  for alpha in (0.2, 0.4, 1.0):
    out = f(policies.mixup(alpha), KEY, x, y)
    ref = mixing.mix_batch(KEY, x, y, policy=policies.mixup(alpha), num_classes=3)
    np.testing.assert_array_equal(np.asarray(out.coeffs.lam_x), np.asarray(ref.coeffs.lam_x))
    np.testing.assert_allclose(out.inputs, ref.inputs, rtol=1e-6, atol=1e-6)
  assert f._cache_size() == 1


def test_traced_alpha_draw_equals_eager_draw_bit_for_bit():
  key = jax.random.key(42)
  f = jax.jit(lambda pol, k: pol(k, 256))
  for pol in (policies.mixup(0.2), policies.mixup(2.0, 0.5), policies.dat(0.4)):
    _assert_coeffs_equal(f(pol, key), pol(key, 256))


def test_unflatten_does_not_revalidate():
  # tree_map and vmap rebuild policies from arrays and placeholders: no validation.
  stacked = jax.tree.map(lambda *v: jnp.stack(v), policies.mixup(0.2), policies.mixup(1.0))
  assert stacked.alpha.shape == (2,)
  keys = jax.random.split(KEY, 2)
  out = jax.vmap(lambda p, k: p(k, 4))(stacked, keys)
  np.testing.assert_array_equal(out.lam_x[1], policies.mixup(1.0)(keys[1], 4).lam_x)
  negated = jax.tree.map(lambda v: -v, policies.untied_mixup(2.2, 0.9))
  assert (negated.alpha, negated.beta) == (-2.2, -0.9)
  treedef = jax.tree.structure(policies.weighted(policies.dat(0.4), jnp.square))
  assert treedef.unflatten([None, None]).policy.alpha is None


def test_traced_alpha_is_checked_under_checks_checked():
  checked = checks.checked(jax.jit(lambda a: sampling.expected_one_minus_lam(policies.mixup(a).alpha)))
  err, _ = checked(-1.0)
  with pytest.raises(Exception, match="alpha must be a finite number > 0"):
    err.throw()
  err, value = checked(1.0)
  err.throw()
  np.testing.assert_allclose(value, sampling.expected_one_minus_lam(1.0), rtol=1e-6)


def test_the_key_comes_first():
  for pol in (policies.erm(), policies.mixup(1.0), policies.untied_mixup(2.2, 0.9),
              policies.dat(1.0), policies.weighted(policies.mixup(1.0), jnp.square)):
    assert list(inspect.signature(pol).parameters) == ["key", "batch_size"]


@pytest.mark.parametrize("policy", [
    policies.mixup(1.0), policies.mixup(0.4, 2.0), policies.mixup(0.2, per_example=False),
    policies.untied_mixup(2.2, 0.9), policies.untied_mixup(0.5, 2.0), policies.dat(1.0),
    policies.dat(0.7, 1.9), policies.erm()])
def test_first_order_weight_matches_monte_carlo(policy):
  """`first_order_weight()` = E[lam_y (1 - lam_x) + (1 - lam_y) lam_x], estimated from draws."""
  n = 400_000
  if getattr(policy, "per_example", True):
    c = policy(jax.random.key(11), n)
  else:  # One lam per batch: n batches of one.
    c = jax.vmap(lambda k: policy(k, 1))(jax.random.split(jax.random.key(11), n))
  lx, ly = np.asarray(c.lam_x, np.float64), np.asarray(c.lam_y, np.float64)
  w = ly * (1 - lx) + (1 - ly) * lx
  stderr = w.std() / np.sqrt(w.size) + 1e-12
  assert abs(w.mean() - policy.first_order_weight()) < 5 * stderr, (w.mean(), stderr)


def test_first_order_weight_closed_forms():
  a, b = 2.2, 0.9
  assert policies.untied_mixup(a, b).first_order_weight() == pytest.approx(b / (a + b))
  assert policies.dat(1.0).first_order_weight() == pytest.approx(0.5)
  assert policies.mixup(1.0).first_order_weight() == pytest.approx(1.0 / 3.0)  # D_lam, a = b = 1.
  assert policies.mixup(a, b).first_order_weight() == pytest.approx(
      2 * a * b / ((a + b) * (a + b + 1)))
  with pytest.raises(ValueError, match="weight="):
    policies.weighted(policies.mixup(1.0), lambda l: l ** 2).first_order_weight()
