"""Samplers against the exact distributions (scipy KS tests, fixed seeds)."""

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from mixjax import sampling

N = 20000


def _ks(samples, cdf):
  return stats.kstest(np.asarray(samples, np.float64), cdf).pvalue


@pytest.mark.parametrize("a,b", [(1.0, 1.0), (2.2, 0.9), (0.9, None)])
def test_beta_matches_scipy(a, b):
  s = sampling.sample_beta(jax.random.key(1), a, b, (N,))
  assert s.dtype == jnp.float32 and s.shape == (N,)
  assert np.all((s >= 0) & (s <= 1))
  assert _ks(s, stats.beta(a, a if b is None else b).cdf) > 1e-3


@pytest.mark.parametrize("a,b", [(0.2, 0.2), (0.4, None), (5.0, 0.5)])
def test_beta_small_alpha_in_float64(a, b):
  # In float32 ~2% of Beta(0.2, 0.2) draws round to exactly 1.0, which a KS
  # test sees as a jump; the sampler itself is checked at full precision.
  with jax.enable_x64(True):
    s = sampling.sample_beta(jax.random.key(1), a, b, (N,), dtype=jnp.float64)
    assert s.dtype == jnp.float64
  assert _ks(s, stats.beta(a, a if b is None else b).cdf) > 1e-3


def test_beta_ks_detects_wrong_distribution():
  s = sampling.sample_beta(jax.random.key(1), 0.4, 0.4, (N,))
  assert _ks(s, stats.beta(1.0, 1.0).cdf) < 1e-6


@pytest.mark.parametrize("a,b", [(2.2, 0.9), (1.4, 0.7), (0.5, 3.0)])
def test_untied_matches_symmetrised_beta_mixture(a, b):
  s = sampling.sample_untied(jax.random.key(2), a, b, (N,))
  f = stats.beta(a, b)
  cdf = lambda x: 0.5 * (f.cdf(x) + 1.0 - f.cdf(1.0 - x))  # noqa: E731
  assert _ks(s, cdf) > 1e-3
  assert _ks(s, f.cdf) < 1e-6  # Not the plain Beta(a, b).


def test_dirichlet_marginals_are_beta():
  w = sampling.sample_dirichlet(jax.random.key(3), 0.7, 3, (N,))
  assert w.shape == (N, 3)
  np.testing.assert_allclose(np.sum(w, -1), 1.0, atol=1e-5)
  for m in range(3):
    assert _ks(w[:, m], stats.beta(0.7, 1.4).cdf) > 1e-3


@pytest.mark.parametrize("a,b", [(2.2, 0.9), (1.4, 0.7), (0.5, 3.0), (1.0, 1.0)])
def test_untied_gamma_formula(a, b):
  lam = np.linspace(0.01, 0.99, 37)
  p = stats.beta(a, b).pdf
  expected = p(lam) / (p(lam) + p(1 - lam))
  np.testing.assert_allclose(sampling.untied_gamma(jnp.asarray(lam, jnp.float32), a, b),
                             expected, rtol=2e-5, atol=1e-6)
  g = sampling.untied_gamma(jnp.array([0.0, 1.0]), a, b)
  assert np.all(np.isfinite(g)) and np.all((g >= 0) & (g <= 1))


def _d_lam_pdf(a, b):
  return lambda x: (a / (a + b)) * stats.beta(a + 1, b).pdf(x) + (b / (a + b)) * stats.beta(b + 1, a).pdf(x)


@pytest.mark.parametrize("a,b", [(0.2, 0.2), (1.0, 1.0), (5.0, 0.5), (2.0, 3.0)])
def test_d_lam_moments_match_numerical_integration(a, b):
  pdf = _d_lam_pdf(a, b)
  m1 = integrate.quad(lambda x: (1 - x) * pdf(x), 0, 1)[0]
  m2 = integrate.quad(lambda x: (1 - x) ** 2 * pdf(x), 0, 1)[0]
  assert sampling.expected_one_minus_lam(a, b) == pytest.approx(m1, rel=1e-6)
  assert sampling.expected_sq_one_minus_lam(a, b) == pytest.approx(m2, rel=1e-6)
  if a == b:
    assert sampling.expected_one_minus_lam(a) == pytest.approx(1 - (a + 1) / (2 * a + 1))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "x", None])
def test_bad_alpha_raises(bad):
  with pytest.raises(ValueError, match="alpha"):
    sampling.sample_beta(jax.random.key(0), bad)
  with pytest.raises(ValueError, match="alpha"):
    sampling.expected_one_minus_lam(bad)


def test_bad_untied_and_dirichlet_args():
  with pytest.raises(ValueError, match="beta must be a finite number > 0"):
    sampling.sample_untied(jax.random.key(0), 1.0, -2.0)
  with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
    sampling.untied_gamma(jnp.float32(0.5), 0.0, 1.0)
  with pytest.raises(ValueError, match="k must"):
    sampling.sample_dirichlet(jax.random.key(0), 1.0, 1)


def test_parameters_are_named_alpha_and_beta():
  k = jax.random.key(0)
  np.testing.assert_array_equal(sampling.sample_untied(k, alpha=2.2, beta=0.9, shape=(8,)),
                                sampling.sample_untied(k, 2.2, 0.9, (8,)))
  lam = jnp.linspace(0.0, 1.0, 5)
  np.testing.assert_array_equal(sampling.untied_gamma(lam, alpha=2.2, beta=0.9),
                                sampling.untied_gamma(lam, 2.2, 0.9))
  assert sampling.resolve_beta(alpha=1, beta=None) == (1.0, 1.0)


def test_the_key_comes_first():
  for fn in (sampling.sample_beta, sampling.sample_dirichlet, sampling.sample_untied):
    assert next(iter(inspect.signature(fn).parameters)) == "key"


def test_traced_parameters_draw_the_same_bits():
  # One compiled sampler serves every alpha, and gives the eager draw bit for bit.
  k = jax.random.key(5)
  beta = jax.jit(lambda k, a, b: sampling.sample_beta(k, a, b, (N,)))
  for a, b in [(0.2, 0.2), (2.2, 0.9), (1.0, 3.0)]:
    np.testing.assert_array_equal(beta(k, a, b), sampling.sample_beta(k, a, b, (N,)))
  assert beta._cache_size() == 1
  dirichlet = jax.jit(lambda k, a: sampling.sample_dirichlet(k, a, 3, (64,)))
  np.testing.assert_array_equal(dirichlet(k, 0.7), sampling.sample_dirichlet(k, 0.7, 3, (64,)))
  untied = jax.jit(lambda k, a, b: sampling.sample_untied(k, a, b, (N,)))
  s = untied(k, 2.2, 0.9)
  f = stats.beta(2.2, 0.9)
  assert _ks(s, lambda x: 0.5 * (f.cdf(x) + 1.0 - f.cdf(1.0 - x))) > 1e-3
  np.testing.assert_allclose(s, sampling.sample_untied(k, 2.2, 0.9, (N,)), rtol=0, atol=1.2e-7)


@pytest.mark.parametrize("a,b", [(2.2, 0.9), (0.5, 3.0), (1.3, 1.3)])
def test_untied_gamma_with_traced_parameters(a, b):
  lam = jnp.asarray(np.r_[0.0, np.linspace(0.01, 0.99, 37), 1.0], jnp.float32)
  traced = jax.jit(sampling.untied_gamma)(lam, a, b)
  assert np.all(np.isfinite(traced)) and np.all((traced >= 0) & (traced <= 1))
  np.testing.assert_allclose(traced, sampling.untied_gamma(lam, a, b), rtol=1e-6, atol=1e-7)
  if a == b:
    np.testing.assert_array_equal(traced, np.full(lam.shape, 0.5, np.float32))


def test_moments_with_traced_parameters():
  m = jax.jit(lambda a, b: (sampling.expected_one_minus_lam(a, b),
                            sampling.expected_sq_one_minus_lam(a, b)))(5.0, 0.5)
  np.testing.assert_allclose(m, (sampling.expected_one_minus_lam(5.0, 0.5),
                                 sampling.expected_sq_one_minus_lam(5.0, 0.5)), rtol=1e-6)


class DeterminismTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_same_key_same_bits(self):
    f = self.variant(lambda k: (sampling.sample_beta(k, 0.3, shape=(64,)),
                                sampling.sample_untied(k, 2.2, 0.9, (64,)),
                                sampling.sample_dirichlet(k, 1.0, 4, (8,))))
    out1, out2 = f(jax.random.key(7)), f(jax.random.key(7))
    for u, v in zip(out1, out2):
      np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    out3 = f(jax.random.key(8))
    assert not np.array_equal(np.asarray(out1[0]), np.asarray(out3[0]))
