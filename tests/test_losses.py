"""Losses against NumPy, and target-linearity (mixed targets == interpolated losses)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixjax import losses


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.fixture
def data():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(6, 5)).astype(np.float32) * 3
  t1 = np.eye(5, dtype=np.float32)[rng.integers(0, 5, 6)]
  t2 = rng.dirichlet(np.ones(5), 6).astype(np.float32)
  lam = rng.uniform(size=6).astype(np.float32)
  return z, t1, t2, lam


def test_softmax_cross_entropy(data):
  z, t1, _, _ = data
  np.testing.assert_allclose(losses.softmax_cross_entropy(z, t1),
                             -(t1 * _np_log_softmax(z)).sum(-1), rtol=1e-5)


def test_sigmoid_cross_entropy(data):
  z, t1, _, _ = data
  p = 1 / (1 + np.exp(-z.astype(np.float64)))
  ref = -(t1 * np.log(p) + (1 - t1) * np.log(1 - p)).sum(-1)
  np.testing.assert_allclose(losses.sigmoid_cross_entropy(z, t1), ref, rtol=1e-5)


def test_class_embeddings_are_unit_and_fixed():
  e = losses.class_embeddings(jax.random.key(0), 10, 300)
  assert e.shape == (10, 300)
  np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(e, losses.class_embeddings(jax.random.key(0), 10, 300))


def test_negative_cosine(data):
  _, t1, t2, _ = data
  rng = np.random.default_rng(1)
  f = rng.normal(size=(6, 7)).astype(np.float32)
  e = np.asarray(losses.class_embeddings(jax.random.key(1), 5, 7))
  v = f / np.linalg.norm(f, axis=-1, keepdims=True)
  np.testing.assert_allclose(losses.negative_cosine(f, t1, e), -(v * (t1 @ e)).sum(-1), rtol=1e-5)
  # Perfect prediction of a one-hot target gives -1.
  np.testing.assert_allclose(losses.negative_cosine(e[:3] * 4.0, np.eye(5)[:3], e), -1.0, rtol=1e-5)


@pytest.mark.parametrize("name", ["softmax", "sigmoid", "cosine"])
def test_target_linear_losses_interpolate(data, name):
  z, t1, t2, lam = data
  if name == "cosine":
    fn = losses.negative_cosine_loss(losses.class_embeddings(jax.random.key(2), 5, 5))
  else:
    fn = {"softmax": losses.softmax_cross_entropy, "sigmoid": losses.sigmoid_cross_entropy}[name]
  a = losses.mixup_loss(fn, z, t1, t2, lam, interpolate=True)
  b = losses.mixup_loss(fn, z, t1, t2, lam, interpolate=False)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  ref = lam * np.asarray(fn(z, t1)) + (1 - lam) * np.asarray(fn(z, t2))
  np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-6)


def test_non_target_linear_loss_differs(data):
  # Squared error is not target-linear: the two forms of the mixup loss differ,
  # so the equality above is a real property, not an artefact of the code.
  z, t1, t2, lam = data
  sq = lambda o, t: jnp.sum((jax.nn.softmax(o) - t) ** 2, -1)  # noqa: E731
  a = losses.mixup_loss(sq, z, t1, t2, lam, interpolate=True)
  b = losses.mixup_loss(sq, z, t1, t2, lam, interpolate=False)
  assert np.max(np.abs(np.asarray(a) - np.asarray(b))) > 1e-2


def test_scalar_lam(data):
  z, t1, t2, _ = data
  a = losses.mixup_loss(losses.softmax_cross_entropy, z, t1, t2, 0.3, interpolate=False)
  ref = losses.softmax_cross_entropy(z, 0.3 * t1 + 0.7 * t2)
  np.testing.assert_allclose(a, ref, rtol=1e-6)


def test_unknown_loss():
  with pytest.raises(ValueError, match="Unknown loss"):
    losses.get_loss("hinge")


def test_negative_cosine_is_scale_invariant_so_q_hat_vanishes():
  """The gradient of the negative-cosine loss is orthogonal to f: MixupE's q^ is 0 there."""
  from mixjax import mixupe
  emb = losses.class_embeddings(jax.random.key(0), 3, 4)
  loss_fn = losses.negative_cosine_loss(emb)
  assert loss_fn.scale_invariant
  f = jax.random.normal(jax.random.key(1), (5, 4))
  t = jax.nn.one_hot(jnp.arange(5) % 3, 3)
  np.testing.assert_allclose(loss_fn(3.0 * f, t), loss_fn(f, t), rtol=1e-6)
  np.testing.assert_allclose(mixupe.q_approx(loss_fn, f, t), 0.0, atol=1e-6)


def test_label_smoothing_then_mixing_by_hand():
  """timm's `mixup_target`: smooth each one-hot (off = s/C, on = 1 - s + s/C), then mix."""
  from mixjax import mixing
  t = mixing.to_targets(np.array([0, 2]), 4, label_smoothing=0.1)
  np.testing.assert_allclose(t[0], [0.925, 0.025, 0.025, 0.025], rtol=1e-6)
  mixed = mixing.mix(t, t[::-1], np.array([0.7, 0.7], np.float32))
  np.testing.assert_allclose(mixed[0], [0.655, 0.025, 0.295, 0.025], rtol=1e-5)
  z = np.array([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, -1.0, 2.0]], np.float32)
  hand = -(np.array([0.655, 0.025, 0.295, 0.025]) * _np_log_softmax(z[0])).sum()
  for interpolate in (True, False):
    got = losses.mixup_loss(losses.softmax_cross_entropy, z, t, t[::-1], 0.7, interpolate)
    np.testing.assert_allclose(got[0], hand, rtol=1e-5)


def _np_bce(z, t):
  return -(t * np.log(1 / (1 + np.exp(-z))) + (1 - t) * np.log(1 / (1 + np.exp(z)))).mean(-1)


def test_bce_with_threshold_against_numpy():
  z = np.array([[1.0, -2.0, 0.5, 3.0]], np.float32)
  mixed = np.array([[0.655, 0.025, 0.295, 0.025]], np.float32)
  np.testing.assert_allclose(losses.get_loss("bce")(z, mixed), _np_bce(z, mixed), rtol=1e-5)
  hard = np.array([[1.0, 0.0, 1.0, 0.0]])  # > 0.2 becomes 1 (timm: target.gt(threshold)).
  np.testing.assert_allclose(losses.get_loss("bce", threshold=0.2)(z, mixed), _np_bce(z, hard),
                             rtol=1e-5)
  np.testing.assert_allclose(losses.binary_cross_entropy(0.295)(z, mixed),
                             _np_bce(z, np.array([[1.0, 0, 0, 0]])), rtol=1e-5)  # Strictly >.
  assert losses.is_target_linear(losses.get_loss("bce"))
  assert not losses.is_target_linear(losses.get_loss("bce", threshold=0.2))
  with pytest.raises(ValueError, match="threshold"):
    losses.get_loss("softmax_xent", threshold=0.2)
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    losses.binary_cross_entropy(1.5)


def test_bce_threshold_objective_mixes_targets():
  """With a threshold the objective thresholds the mixed target, not each one-hot."""
  from mixjax import adapters, methods
  obj = methods.get_objective("mixup", num_classes=4, loss="bce", bce_threshold=0.2,
                              label_smoothing=0.1)
  assert obj.interpolate is False
  x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
  y = np.array([0, 1, 2, 3, 0])
  apply = adapters.make_apply_fn(lambda p, x: x * p)
  prepared = obj.prepare(apply, {"params": 2.0}, x, y, jax.random.key(0))
  per_example, out, _ = obj.losses(apply, {"params": 2.0}, x, prepared)
  d = prepared.draw
  ly = np.asarray(d.coeffs.lam_y)[:, None]
  t = np.asarray(d.targets_a) * ly + np.asarray(d.targets_b) * (1 - ly)
  np.testing.assert_allclose(per_example, _np_bce(np.asarray(out), (t > 0.2) * 1.0), rtol=1e-5)
  with pytest.raises(ValueError, match="needs loss='bce'"):
    methods.get_objective("mixup", num_classes=4, bce_threshold=0.2)
