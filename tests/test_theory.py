"""mixjax.theory against closed forms (NumPy), SciPy, quadrature and brute-force Monte Carlo."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mixjax import sampling
from mixjax import theory

ALPHA = 0.3


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _logistic_data(n=24, d=3, scale=1.0, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)) * scale
  theta = rng.normal(size=d)
  y = (rng.random(n) < _sigmoid(x @ theta / scale)).astype(np.float64)
  return x, y, theta


def _mlp(seed=1, d=3, hidden=8, m=3):
  rng = np.random.default_rng(seed)
  w1, b1 = rng.normal(size=(d, hidden)), rng.normal(size=hidden)  # b1: curvature at x = 0
  w2, b2 = rng.normal(size=(hidden, m)) / np.sqrt(hidden), 0.1 * rng.normal(size=m)
  return lambda v: jnp.tanh(v @ w1 + b1) @ w2 + b2


def _brute_force_gap(seed, apply_fn, link, x, y, alpha, num_lam=4096):
  """(mixup loss - standard loss) of Eq. (1) by brute force, and its standard error.

  Every pair (i, j) of the n^2, and `num_lam` draws lam ~ Beta(alpha, alpha) shared by all
  pairs: `mean_k [1/n^2 sum_ij l(lam_k x_i + (1-lam_k) x_j, lam_k y_i + (1-lam_k) y_j)] - L_std`.
  """
  n = x.shape[0]
  y = y.reshape(n, -1)
  out = lambda v: apply_fn(v).reshape(v.shape[0], -1)  # noqa: E731
  lam = jnp.asarray(np.random.default_rng(seed).beta(alpha, alpha, num_lam), x.dtype)

  def one(l):
    mixed = (l * x[:, None] + (1 - l) * x[None, :]).reshape(n * n, -1)
    targets = (l * y[:, None] + (1 - l) * y[None, :]).reshape(n * n, -1)
    return jnp.mean(theory.glm_loss(link, out(mixed), targets))

  gaps = jax.lax.map(one, lam, batch_size=64) - jnp.mean(theory.glm_loss(link, out(x), y))
  return float(jnp.mean(gaps)), float(jnp.std(gaps)) / np.sqrt(num_lam)


# ----------------------------------------------------------------------------- D_lam


def test_d_lam_sampler_matches_the_beta_mixture():
  a, b = 0.7, 2.5
  lam = np.asarray(theory.sample_d_lam(jax.random.key(0), a, b, (20000,)))
  cdf = lambda t: (a / (a + b) * stats.beta.cdf(t, a + 1, b)  # noqa: E731
                   + b / (a + b) * stats.beta.cdf(t, b + 1, a))
  assert stats.kstest(lam, cdf).pvalue > 1e-3
  e1, e2 = theory.d_lam_moments(a, b)
  mix_mean = lambda k: (a / (a + b) * stats.beta(b, a + 1).moment(k)  # 1-lam ~ Beta(b, a+1)
                        + b / (a + b) * stats.beta(a, b + 1).moment(k))
  np.testing.assert_allclose([e1, e2], [mix_mean(1), mix_mean(2)], rtol=1e-10)
  np.testing.assert_allclose([np.mean(1 - lam), np.mean((1 - lam) ** 2)], [e1, e2], rtol=0.03)


def test_beta_quadrature_is_exact_for_polynomials():
  lam, w = theory.beta_quadrature(0.2, 3.0, num_nodes=8)
  for k in range(1, 16):
    np.testing.assert_allclose(np.sum(w * lam ** k), stats.beta(0.2, 3.0).moment(k), rtol=1e-7)
  with pytest.raises(ValueError, match="num_nodes"):
    theory.beta_quadrature(1.0, num_nodes=0)
  with pytest.raises(ValueError, match="alpha"):
    theory.beta_quadrature(0.0)


# ----------------------------------------------------------------------------- closed forms


def test_logistic_regression_closed_form():
  # GLM: grad f = theta, hess f = 0 => R3 = 0; R1, R2 recomputed in NumPy.
  x, y, theta = _logistic_data()
  bias = 0.3
  x32, y32 = x.astype(np.float32), y.astype(np.float32)
  terms = theory.quadratic_terms(lambda v: v @ theta.astype(np.float32) + bias, "logistic",
                                 x32, y32, ALPHA, batch_size=5)
  e1, e2 = sampling.expected_one_minus_lam(ALPHA), sampling.expected_sq_one_minus_lam(ALPHA)
  f = x @ theta + bias
  g = _sigmoid(f)
  rbar = x.mean(0)
  r1 = e1 * np.mean((g - y) * ((rbar - x) @ theta))
  diffs = x[None, :, :] - x[:, None, :]                        # [i, r, d] = r - x_i
  quad = np.mean((diffs @ theta) ** 2, axis=1)                 # theta^T E_r[(r-x_i)(r-x_i)^T] theta
  r2 = e2 / 2 * np.mean(g * (1 - g) * quad)
  std = np.mean(np.logaddexp(0, f) - y * f)
  np.testing.assert_allclose([terms.standard, terms.r1, terms.r2], [std, r1, r2], rtol=2e-5)
  assert float(terms.r3) == 0.0


def test_softmax_linear_model_closed_form():
  rng = np.random.default_rng(3)
  n, d, m = 20, 4, 3
  x = rng.normal(size=(n, d))
  w, b = rng.normal(size=(d, m)), rng.normal(size=m)
  y = np.eye(m)[rng.integers(0, m, n)]
  terms = theory.quadratic_terms(lambda v: v @ w.astype(np.float32) + b.astype(np.float32),
                                 "softmax", x.astype(np.float32), y.astype(np.float32), 1.5, 0.5)
  e1, e2 = theory.d_lam_moments(1.5, 0.5)
  p = _softmax(x @ w + b)
  rbar = x.mean(0)
  r1 = e1 * np.mean(np.sum((p - y) * ((rbar - x) @ w), -1))
  u = (x[None, :, :] - x[:, None, :]) @ w                      # [i, r, m] = J (r - x_i)
  hess = np.einsum("ik,kl->ikl", p, np.eye(m)) - p[:, :, None] * p[:, None, :]
  r2 = e2 / 2 * np.mean(np.einsum("irk,ikl,irl->ir", u, hess, u))
  np.testing.assert_allclose([terms.r1, terms.r2], [r1, r2], rtol=2e-5)
  assert abs(float(terms.r3)) < 1e-7


def test_quadratic_model_closed_form_r3():
  # f(x) = x^T A x / 2 + c^T x: grad f = A x + c, hess f = A (R3 != 0), in NumPy.
  rng = np.random.default_rng(4)
  n, d = 16, 3
  x = rng.normal(size=(n, d))
  a = rng.normal(size=(d, d))
  a = (a + a.T) / 2
  c = rng.normal(size=d)
  y = rng.integers(0, 2, n).astype(np.float64)
  a32, c32 = a.astype(np.float32), c.astype(np.float32)
  fn = lambda v: 0.5 * jnp.einsum("bi,ij,bj->b", v, a32, v) + v @ c32  # noqa: E731
  terms = theory.quadratic_terms(fn, "logistic", x.astype(np.float32), y.astype(np.float32), 2.0)
  e1, e2 = theory.d_lam_moments(2.0)
  f = 0.5 * np.einsum("bi,ij,bj->b", x, a, x) + x @ c
  g = _sigmoid(f)
  grad = x @ a + c
  diffs = x[None, :, :] - x[:, None, :]
  r1 = e1 * np.mean((g - y) * np.sum(grad * (x.mean(0) - x), -1))
  r2 = e2 / 2 * np.mean(g * (1 - g) * np.mean(np.einsum("ird,id->ir", diffs, grad) ** 2, 1))
  r3 = e2 / 2 * np.mean((g - y) * np.mean(np.einsum("ird,de,ire->ir", diffs, a, diffs), 1))
  np.testing.assert_allclose([terms.r1, terms.r2, terms.r3], [r1, r2, r3], rtol=1e-4)
  assert abs(r3) > 0.1 * abs(r2)


def test_logistic_regression_closed_form_around_the_mean_mixed_input():
  # center='mean': expand l_i at m_i = x_i + e1 (r_bar - x_i). Linear f: R1 = 0 (the first
  # order term has mean zero), R3 = 0, and R2 = 1/2n sum_i sigma'(f(m_i)) theta^T Cov theta,
  # Cov = e2 E_r[v v^T] - e1^2 v_bar v_bar^T, v = r - x_i: recomputed in NumPy.
  x, y, theta = _logistic_data()
  bias = 0.3
  terms = theory.quadratic_terms(lambda v: v @ theta.astype(np.float32) + bias, "logistic",
                                 x.astype(np.float32), y.astype(np.float32), ALPHA,
                                 batch_size=5, center="mean")
  e1, e2 = sampling.expected_one_minus_lam(ALPHA), sampling.expected_sq_one_minus_lam(ALPHA)
  rbar = x.mean(0)
  m = x + e1 * (rbar - x)
  f = m @ theta + bias
  g = _sigmoid(f)
  diffs = x[None, :, :] - x[:, None, :]                        # [i, r, d] = r - x_i
  var = e2 * np.mean((diffs @ theta) ** 2, axis=1) - e1 ** 2 * ((rbar - x) @ theta) ** 2
  r2 = 0.5 * np.mean(g * (1 - g) * var)
  std = np.mean(np.logaddexp(0, f) - y * f)
  np.testing.assert_allclose([terms.standard, terms.r2], [std, r2], rtol=2e-5)
  assert float(terms.r1) == 0.0 and float(terms.r3) == 0.0


def test_quadratic_model_closed_form_around_the_mean_mixed_input():
  # f(x) = x^T A x / 2 + c^T x: at m_i, grad f = A m_i + c and D^2 f[u, u] = u^T A u, and
  # each quadratic form q enters as e2 E_r q(v_r) - e1^2 q(v_bar); in NumPy.
  rng = np.random.default_rng(4)
  n, d = 16, 3
  x = rng.normal(size=(n, d))
  a = rng.normal(size=(d, d))
  a = (a + a.T) / 2
  c = rng.normal(size=d)
  y = rng.integers(0, 2, n).astype(np.float64)
  a32, c32 = a.astype(np.float32), c.astype(np.float32)
  fn = lambda v: 0.5 * jnp.einsum("bi,ij,bj->b", v, a32, v) + v @ c32  # noqa: E731
  terms = theory.quadratic_terms(fn, "logistic", x.astype(np.float32), y.astype(np.float32), 2.0,
                                 center="mean")
  e1, e2 = theory.d_lam_moments(2.0)
  vbar = x.mean(0) - x
  m = x + e1 * vbar
  f = 0.5 * np.einsum("bi,ij,bj->b", m, a, m) + m @ c
  g = _sigmoid(f)
  grad = m @ a + c
  diffs = x[None, :, :] - x[:, None, :]
  quad_j = (e2 * np.mean(np.einsum("ird,id->ir", diffs, grad) ** 2, 1)
            - e1 ** 2 * np.sum(vbar * grad, -1) ** 2)
  quad_a = (e2 * np.mean(np.einsum("ird,de,ire->ir", diffs, a, diffs), 1)
            - e1 ** 2 * np.einsum("id,de,ie->i", vbar, a, vbar))
  np.testing.assert_allclose(
      [terms.standard, terms.r2, terms.r3],
      [np.mean(np.logaddexp(0, f) - y * f), 0.5 * np.mean(g * (1 - g) * quad_j),
       0.5 * np.mean((g - y) * quad_a)], rtol=1e-4)
  assert float(terms.r1) == 0.0 and abs(float(terms.r3)) > 1e-3 * abs(float(terms.r2))


@pytest.mark.parametrize("center", theory.CENTERS)
def test_both_expansions_are_exact_for_a_loss_quadratic_in_the_input(center):
  # Squared link, linear model: l_i(v) = (w.v + b)^2 / 2 - y_i (w.v + b) is quadratic in v,
  # so any second-order expansion is exact. The mixup loss in closed form (Lemma 3.1's
  # per-example form with the D_lam moments e1, e2), in NumPy.
  rng = np.random.default_rng(5)
  n, d = 12, 3
  x, w, b = rng.normal(size=(n, d)), rng.normal(size=d), 0.4
  y = rng.normal(size=n)
  e1, e2 = theory.d_lam_moments(0.7, 1.3)
  fx = x @ w + b
  fv = (x[None, :, :] - x[:, None, :]) @ w                     # [i, r] = w . (r - x_i)
  exact = np.mean(0.5 * (fx ** 2 + 2 * e1 * fx * fv.mean(1) + e2 * np.mean(fv ** 2, 1))
                  - y * (fx + e1 * fv.mean(1)))
  with jax.enable_x64(True):
    fn = lambda v: v @ w + b  # noqa: E731
    terms = theory.quadratic_terms(fn, "squared", x, y, 0.7, 1.3, center=center)
    quadrature = theory.mixup_loss_exact(fn, "squared", x, y, 0.7, 1.3, num_nodes=8)
  np.testing.assert_allclose([float(terms.approx), float(quadrature)], [exact, exact], rtol=1e-10)


# ----------------------------------------------------------------------------- vs the mixup loss


@pytest.mark.parametrize("model", ["logistic", "mlp"])
def test_terms_match_brute_force_monte_carlo(model):
  """R1 + R2 + R3 ~ (mixup loss - standard loss), sampled by brute force (inputs scaled so
  that (1-lam) times the data spread is small: the regime where the expansion holds)."""
  if model == "logistic":
    x, y, theta = _logistic_data(n=32, scale=0.25)
    x, y = x.astype(np.float32), y.astype(np.float32)
    fn, link = (lambda v: v @ theta.astype(np.float32) + 0.3), "logistic"
  else:
    rng = np.random.default_rng(2)
    x = (0.05 * rng.normal(size=(32, 3))).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 32)]
    fn, link = _mlp(), "softmax"
  terms = theory.quadratic_terms(fn, link, x, y, ALPHA)
  approx_gap = float(terms.r1 + terms.r2 + terms.r3)
  gap, se = _brute_force_gap(7, fn, link, jnp.asarray(x), jnp.asarray(y), ALPHA)
  assert se < 0.02 * abs(gap)
  assert abs(gap - approx_gap) < 4 * se + 0.01 * abs(gap), (gap, se, approx_gap)
  if model == "mlp":  # All three terms matter here.
    assert min(abs(float(terms.r2)), abs(float(terms.r3))) > 0.01 * abs(approx_gap)
  # Eq. (1) by quadrature over lam agrees with both.
  exact = float(theory.mixup_loss_exact(fn, link, x, y, ALPHA, num_nodes=48))
  assert abs(exact - float(terms.standard) - gap) < 4 * se
  assert abs(exact - float(terms.approx)) < 0.01 * abs(approx_gap)


def test_monte_carlo_and_per_example_forms_of_the_mixup_loss_agree():
  # Eq. (1) sampled over (i, j, lam), and Lemma 3.1's first step, lam ~ D_lam per example
  # without mixing labels, against the quadrature over all pairs.
  x, y, theta = _logistic_data(n=16)
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  fn = lambda v: v @ theta.astype(np.float32)  # noqa: E731
  exact = float(theory.mixup_loss_exact(fn, "logistic", x, y, 0.5, 2.0))
  mc, se = theory.mixup_loss_monte_carlo(jax.random.key(1), fn, "logistic", x, y, 0.5, 2.0,
                                         num_samples=100_000)
  assert abs(float(mc) - exact) < 4 * float(se)
  k = 100_000
  rng = np.random.default_rng(2)
  i, r = rng.integers(0, 16, k), rng.integers(0, 16, k)
  first = rng.random(k) < 0.5 / 2.5  # D_lam = a/(a+b) Beta(a+1, b) + b/(a+b) Beta(b+1, a)
  lam = np.where(first, rng.beta(1.5, 2.0, k), rng.beta(3.0, 0.5, k)).astype(np.float32)[:, None]
  per = theory.glm_loss("logistic", fn(lam * x[i] + (1 - lam) * x[r])[:, None], y[i][:, None])
  assert abs(float(jnp.mean(per)) - exact) < 4 * float(jnp.std(per)) / np.sqrt(k)


def test_remainder_is_third_order_in_the_input_scale():
  # Scaling the inputs by s scales the k-th derivative along r - x_i by s^k: if R1, R2, R3
  # are the right first- and second-order terms, the remainder falls ~8x when s halves.
  rng = np.random.default_rng(0)
  x0 = rng.normal(size=(16, 3))
  y = np.eye(3)[rng.integers(0, 3, 16)]
  with jax.enable_x64(True):
    fn = _mlp()
    rest = []
    for s in (1 / 8, 1 / 16):
      terms = theory.quadratic_terms(fn, "softmax", x0 * s, y, ALPHA)
      exact = theory.mixup_loss_exact(fn, "softmax", x0 * s, y, ALPHA, num_nodes=48)
      rest.append(float(exact - terms.approx))
      assert abs(rest[-1]) < 0.05 * abs(float(exact - terms.standard))
      assert abs(float(terms.r3)) > 10 * abs(rest[-1])  # Dropping R3 would break the order.
    assert abs(rest[0] / rest[1]) > 6.0, rest


def test_quadratic_terms_are_differentiable_in_the_parameters():
  x, y, theta = _logistic_data(n=12)
  loss = lambda th: theory.approximate_mixup_loss(lambda v: v @ th, "logistic", x, y, 1.0)  # noqa
  with jax.enable_x64(True):
    g = jax.grad(loss)(jnp.asarray(theta))
    eps, jloss = 1e-6, jax.jit(loss)
    fd = [(jloss(theta + eps * e) - jloss(theta - eps * e)) / (2 * eps) for e in np.eye(3)]
  np.testing.assert_allclose(g, fd, rtol=1e-5)


# ----------------------------------------------------------------------------- Lemma 3.2, Thm 3.1


def test_adversarial_loss_approx_logistic():
  x, y, theta = _logistic_data(n=20)
  eta = 0.05
  with jax.enable_x64(True):
    got = float(theory.adversarial_loss_approx(lambda v: v @ theta, "logistic", x, y, eta))
  f = x @ theta
  g = _sigmoid(f)
  norm = np.linalg.norm(theta)
  lemma = np.mean(np.logaddexp(0, f) - y * f + eta * np.abs(g - y) * norm
                  + eta ** 2 / 2 * g * (1 - g) * norm ** 2)
  np.testing.assert_allclose(got, lemma, rtol=1e-10)
  # The true l2 worst case (delta = +-eta theta/|theta|, the loss being monotone in f).
  f_adv = f + np.where(y > 0.5, -1, 1) * eta * norm
  worst = np.mean(np.logaddexp(0, f_adv) - y * f_adv)
  assert abs(worst - lemma) < 1e-3 * eta * norm


def test_theorem_3_1_mixup_loss_bounds_the_adversarial_loss():
  # Centred inputs, f(x) = x^T theta, theta with zero training error (theta in Theta).
  rng = np.random.default_rng(5)
  n, d = 40, 5
  x = rng.normal(size=(n, d))
  x -= x.mean(0)
  theta = rng.normal(size=d)
  y = (x @ theta > 0).astype(np.float64)
  alpha, beta = 1.0, 0.5
  with jax.enable_x64(True):
    fn = lambda v: v @ theta  # noqa: E731
    rad = theory.mixup_radius(theta, x, alpha, beta)
    mix = float(theory.approximate_mixup_loss(fn, "logistic", x, y, alpha, beta))
    adv_i = float(theory.adversarial_loss_approx(fn, "logistic", x, y, rad.eps_i * np.sqrt(d)))
    adv = float(theory.adversarial_loss_approx(fn, "logistic", x, y, rad.l2_radius))
  cos = np.abs(x @ theta) / (np.linalg.norm(x, axis=1) * np.linalg.norm(theta))
  c_x = np.linalg.norm(x, axis=1).min() / np.sqrt(d)
  e1 = theory.d_lam_moments(alpha, beta)[0]
  np.testing.assert_allclose(
      [rad.cos_min, rad.c_x, rad.eps_mix, rad.l2_radius],
      [cos.min(), c_x, cos.min() * c_x * e1, cos.min() * c_x * e1 * np.sqrt(d)], rtol=1e-10)
  assert mix >= adv_i >= adv > float(theory.standard_loss(lambda v: v @ theta, "logistic", x, y))


# ----------------------------------------------------------------------------- errors


def test_bad_arguments_raise():
  x, y, theta = _logistic_data(n=8)
  fn = lambda v: v @ theta  # noqa: E731
  with pytest.raises(ValueError, match="Unknown link"):
    theory.quadratic_terms(fn, "hinge", x, y, 1.0)
  with pytest.raises(ValueError, match="y must be targets"):
    theory.quadratic_terms(fn, "logistic", x, y[:5], 1.0)
  with pytest.raises(ValueError, match="columns"):
    theory.quadratic_terms(fn, "logistic", x, np.ones((8, 2)), 1.0)
  with pytest.raises(ValueError, match="alpha"):
    theory.quadratic_terms(fn, "logistic", x, y, -1.0)
  with pytest.raises(ValueError, match="batch_size"):
    theory.quadratic_terms(fn, "logistic", x, y, 1.0, batch_size=0)
  with pytest.raises(ValueError, match="dtype"):
    theory.quadratic_terms(fn, "logistic", x.astype(np.int32), y, 1.0)
  with pytest.raises(ValueError, match="center must be one of"):
    theory.quadratic_terms(fn, "logistic", x, y, 1.0, center="x")
  with pytest.raises(ValueError, match="one model output"):
    theory.adversarial_loss_approx(lambda v: jnp.stack([v @ theta] * 2, -1), "softmax", x,
                                   np.ones((8, 2)), 0.1)
  with pytest.raises(ValueError, match="radius"):
    theory.adversarial_loss_approx(fn, "logistic", x, y, -0.1)
  with pytest.raises(ValueError, match="theta must not be zero"):
    theory.mixup_radius(np.zeros(3), x, 1.0)
