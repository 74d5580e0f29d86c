"""mixjax.attacks: closed-form worst cases, budgets, ranges, and black-box isolation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixjax import attacks


def _linear(seed=0, d=6, c=2):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(d, c)).astype(np.float32)
  b = rng.normal(size=c).astype(np.float32)
  return w, b, (lambda v: v.reshape(v.shape[0], -1) @ w + b)


def _mlp(seed=1, d=12, c=4):
  rng = np.random.default_rng(seed)
  w1 = rng.normal(size=(d, 16)).astype(np.float32)
  w2 = rng.normal(size=(16, c)).astype(np.float32)
  return lambda v: jnp.tanh(v.reshape(v.shape[0], -1) @ w1) @ w2


def _xent(logits, y):
  z = logits - logits.max(-1, keepdims=True)
  return -(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(-1)))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fgsm_on_a_linear_model_is_the_closed_form_worst_case(norm):
  # Two classes: the loss is a decreasing function of the margin m = (w_y - w_o).x + (b_y - b_o),
  # so the worst case over the ball is -eps sign(w_y - w_o) (linf) / -eps u/|u| (l2).
  w, b, fn = _linear()
  rng = np.random.default_rng(1)
  x = rng.normal(size=(32, 6)).astype(np.float32)
  y = rng.integers(0, 2, 32).astype(np.int32)
  eps = 0.1
  x_adv = np.asarray(attacks.fgsm(fn, jnp.asarray(x), jnp.asarray(y), eps, norm=norm,
                                  clip_min=None, clip_max=None))
  u = (w[:, y] - w[:, 1 - y]).T                                 # [B, d]
  if norm == "linf":
    delta = -eps * np.sign(u)
    shrink = eps * np.abs(u).sum(-1)
  else:
    delta = -eps * u / np.linalg.norm(u, axis=-1, keepdims=True)
    shrink = eps * np.linalg.norm(u, axis=-1)
  np.testing.assert_allclose(x_adv, x + delta, atol=1e-6)
  margin = (u * x).sum(-1) + b[y] - b[1 - y]
  worst = np.logaddexp(0, -(margin - shrink))                   # closed-form worst-case loss
  np.testing.assert_allclose(_xent(np.asarray(fn(x_adv)), y), worst, rtol=1e-5)
  for _ in range(20):  # No other point of the ball does better.
    r = rng.normal(size=x.shape)
    r = (eps * np.sign(r) if norm == "linf"
         else eps * r / np.linalg.norm(r, axis=-1, keepdims=True))
    assert np.all(_xent(np.asarray(fn(x + r)), y) <= worst + 1e-5)


def test_fgsm_multiclass_matches_numpy_gradient_sign():
  w, b, fn = _linear(c=5, d=8)
  rng = np.random.default_rng(2)
  x = rng.random(size=(16, 8)).astype(np.float32)
  y = rng.integers(0, 5, 16).astype(np.int32)
  z = x @ w + b
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  grad = (p - np.eye(5)[y]) @ w.T                               # d xent / dx
  want = np.clip(x + 0.05 * np.sign(grad), 0, 1)
  got = attacks.fgsm(fn, jnp.asarray(x), jnp.asarray(y), 0.05)
  np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_ifgsm_stays_in_the_budget_and_the_valid_range(norm):
  fn = _mlp()
  rng = np.random.default_rng(3)
  x = rng.random(size=(64, 3, 4)).astype(np.float32)            # non-flat inputs
  x[:8] = np.round(x[:8])                                       # some on the range's edges
  y = rng.integers(0, 4, 64).astype(np.int32)
  eps = 0.1 if norm == "linf" else 0.5
  x_adv = np.asarray(attacks.ifgsm(fn, jnp.asarray(x), jnp.asarray(y), eps, steps=10,
                                   step_size=eps / 4, norm=norm))  # steps overshoot the ball
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  delta = (x_adv - x).reshape(64, -1)
  size = np.abs(delta).max(-1) if norm == "linf" else np.linalg.norm(delta, axis=-1)
  assert size.max() <= eps * (1 + 1e-5)
  assert size.max() > 0.9 * eps                                 # it does use the budget
  clean = _xent(np.asarray(fn(x)), y)
  one_step = _xent(np.asarray(fn(attacks.fgsm(fn, x, y, eps, norm=norm))), y)
  iterated = _xent(np.asarray(fn(x_adv)), y)
  assert iterated.mean() > one_step.mean() > clean.mean()


def test_ifgsm_with_one_full_step_is_fgsm_and_jit_matches_eager():
  fn = _mlp()
  rng = np.random.default_rng(4)
  x = rng.random(size=(8, 12)).astype(np.float32)
  y = rng.integers(0, 4, 8).astype(np.int32)
  one = attacks.ifgsm(fn, x, y, 0.03, steps=1)
  np.testing.assert_allclose(one, attacks.fgsm(fn, x, y, 0.03), atol=1e-7)
  attack = attacks.Attack("ifgsm", eps=0.03, steps=5)
  np.testing.assert_allclose(attacks.make_attack(fn, attack)(x, y), attack(fn, x, y), atol=1e-6)


def _not_differentiable(fn, log):
  """`fn` for forward calls; any attempt to differentiate it raises (and is logged)."""
  @jax.custom_jvp
  def guarded(v):
    return fn(v)

  @guarded.defjvp
  def _jvp(primals, tangents):
    log.append("differentiated")
    raise AssertionError("the black-box target was differentiated")

  return guarded


def test_black_box_uses_only_the_source_gradients():
  source, target_fn = _mlp(seed=1), _mlp(seed=2)
  log = []
  target = _not_differentiable(target_fn, log)
  with pytest.raises(AssertionError):  # The guard does catch differentiation.
    jax.grad(lambda v: jnp.sum(target(v)))(jnp.ones((2, 12)))
  log.clear()
  rng = np.random.default_rng(5)
  x = rng.random(size=(40, 12)).astype(np.float32)
  y = rng.integers(0, 4, 40).astype(np.int32)
  attack = attacks.Attack("ifgsm", eps=0.1, steps=3)
  res = attacks.evaluate(source, {"src": source, "target": target}, x, y, attack, batch_size=16)
  assert not log
  # The target sees exactly the source's white-box examples.
  x_adv = np.asarray(attack(source, x, y))
  for name, fn in (("src", source), ("target", target_fn)):
    err = attacks.topk_errors(fn(x_adv), jnp.asarray(y))
    np.testing.assert_allclose(res[name].top1, float(jnp.mean(err[1])), atol=1e-6)
    np.testing.assert_allclose(res[name].top5, float(jnp.mean(err[5])), atol=1e-6)
    clean = np.mean(np.argmax(np.asarray(fn(x)), -1) != y)
    np.testing.assert_allclose(res[name].clean_top1, clean, atol=1e-6)
  assert res["src"].top1 >= res["src"].clean_top1


def test_evaluate_compiles_once_per_model_and_attack_shape():
  """Calls differing only in eps (or repeated) reuse the compiled attack and forward pass."""
  mlp, traces = _mlp(seed=3), []

  def fn(v):
    traces.append(v.shape)  # Runs only while tracing: under jit, once per compilation.
    return mlp(v)

  rng = np.random.default_rng(6)
  x = rng.random(size=(32, 12)).astype(np.float32)
  y = rng.integers(0, 4, 32).astype(np.int32)
  first = attacks.evaluate(fn, {"m": fn}, x, y, attacks.Attack("ifgsm", 0.05, steps=3),
                           batch_size=16)
  assert traces
  n = len(traces)
  again = attacks.evaluate(fn, {"m": fn}, x, y, attacks.Attack("ifgsm", 0.05, steps=3),
                           batch_size=16)
  larger = attacks.evaluate(fn, {"m": fn}, x, y, attacks.Attack("ifgsm", 0.2, steps=3),
                            batch_size=16)
  assert len(traces) == n
  assert again == first
  x_adv = attacks.Attack("ifgsm", 0.2, steps=3)(mlp, x, y)  # Eager, for the values.
  np.testing.assert_allclose(larger["m"].top1,
                             float(jnp.mean(attacks.topk_errors(mlp(x_adv), jnp.asarray(y))[1])),
                             atol=1e-6)


def test_topk_errors_against_numpy():
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(50, 7)).astype(np.float32)
  y = rng.integers(0, 7, 50).astype(np.int32)
  err = attacks.topk_errors(jnp.asarray(logits), jnp.asarray(y), ks=(1, 3, 5, 9))
  order = np.argsort(-logits, axis=-1)
  for k in (1, 3, 5):
    np.testing.assert_array_equal(err[k], 1.0 - (order[:, :k] == y[:, None]).any(-1))
  np.testing.assert_array_equal(err[9], np.zeros(50))


def test_table3_layout():
  r = lambda a, b: attacks.Result(a, b, 0.0)  # noqa: E731
  white = {"FGSM": {"ERM": r(0.907, 0.631), "mixup": r(0.752, 0.491)},
           "I-FGSM": {"ERM": r(0.999, 0.934), "mixup": r(0.996, 0.958)}}
  text = attacks.table3(white, white)
  lines = text.splitlines()
  assert lines[0] == "(a) White box attacks."
  assert "| Metric | Method | FGSM | I-FGSM |" in lines
  assert "| Top-1 | ERM | 90.7 | 99.9 |" in lines and "|  | mixup | 75.2 | 99.6 |" in lines
  assert "| Top-5 | ERM | 63.1 | 93.4 |" in lines
  assert "(b) Black box attacks." in lines
  assert "Black box" not in attacks.table3(white)


def test_bad_arguments_raise():
  fn = _mlp()
  x, y = np.zeros((2, 12), np.float32), np.zeros(2, np.int32)
  with pytest.raises(ValueError, match="norm"):
    attacks.fgsm(fn, x, y, 0.1, norm="l1")
  with pytest.raises(ValueError, match="eps"):
    attacks.fgsm(fn, x, y, -0.1)
  with pytest.raises(ValueError, match="steps"):
    attacks.ifgsm(fn, x, y, 0.1, steps=0)
  with pytest.raises(ValueError, match="clip_min"):
    attacks.fgsm(fn, x, y, 0.1, clip_min=1.0, clip_max=0.0)
  with pytest.raises(ValueError, match="labels"):
    attacks.fgsm(fn, x, y.astype(np.float32), 0.1)
  with pytest.raises(ValueError, match="dtype"):
    attacks.fgsm(fn, x.astype(np.uint8), y, 0.1)
  with pytest.raises(ValueError, match="method"):
    attacks.make_attack(fn, attacks.Attack("pgd"))
  with pytest.raises(ValueError, match="batch_size"):
    attacks.evaluate(fn, {"m": fn}, x, y, attacks.Attack(), batch_size=0)
