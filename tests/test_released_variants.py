"""The authors' released code as `variant='released'` of AMP and MixupE, against NumPy.

Each reference below is re-derived in NumPy from a reading of the released
code (AMP: PAI-SmallIsAllYourNeed/Mixup-AMP `run_main.py`, `model.py`;
MixupE: oneHuster/MixupE `mixup.py`, version 3), for a linear softmax model
whose lambda gradient is written out by hand; none of the library's helpers
is called to compute a reference.
"""

import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mixjax import adapters, amp, methods, mixing, mixupe, objectives, policies, train_step

B, D, C = 6, 4, 3


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _xent(z, t):
  zs = z - z.max(-1, keepdims=True)
  return -np.sum(t * (zs - np.log(np.exp(zs).sum(-1, keepdims=True))), -1)


def _problem(seed=0):
  """(apply, params, x f32[B, D], y int[B]) of a linear softmax model."""
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.normal(size=(D, C)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=C) * 0.3, jnp.float32)}
  x = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
  y = jnp.asarray(rng.integers(0, C, B))
  apply = adapters.make_apply_fn(lambda p, v: v @ p["w"] + p["b"])
  return apply, params, x, y


def _np(params, x, y):
  return (np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64),
          np.asarray(x, np.float64), np.eye(C)[np.asarray(y)])


@dataclasses.dataclass(frozen=True)
class FixedDraw(objectives.Wrapper):
  """The base with given per-example `lam` (inputs and labels) and partner indices."""
  lam: Any = None
  perm: Any = None

  def prepare(self, apply, variables, inputs, labels, key):
    prepared = self.base.prepare(apply, variables, inputs, labels, key)
    lam = jnp.asarray(self.lam, jnp.float32)
    perm = jnp.asarray(self.perm, jnp.int32)
    t = prepared.draw.targets_a
    draw = mixing.Draw(policies.Coefficients(lam, lam), perm, t, t[perm])
    return prepared._replace(draw=draw)


def _base():
  return objectives.mixup(policies.mixup(1.0), num_classes=C)


# ----------------------------------------------------------------------------
# AMP, released.


def _amp_released_step(w, b, x, t, lam, perm, eps, history, window=5):
  """One step of the released rule in NumPy (float64).

  Returns (loss, weights, mask, grads (dW, db), history + [this step's positive deltas],
  the literal released weights (NaN where the code's std is NaN or 0)).
  """
  n = len(lam)

  def per_example(lx, ly):
    xm = lx[:, None] * x + (1 - lx[:, None]) * x[perm]
    ty = ly[:, None] * t + (1 - ly[:, None]) * t[perm]
    return _xent(xm @ w + b, ty), xm, ty

  loss, xm, ty = per_example(lam, lam)
  p = _softmax(xm @ w + b)
  # dL_i/dlam_x with the label coefficient held (the code detaches it in mixup_process).
  g = np.sum((p - ty) * ((x - x[perm]) @ w), axis=1)
  # lam.grad of torch.mean(loss) is g / B, unclipped; lam' is kept in [0, 1] (documented).
  lam_adv = np.clip(lam + eps * g / n, 0.0, 1.0)
  loss_adv, xm_adv, ty_adv = per_example(lam_adv, lam_adv)  # Labels mixed with lam' too.
  delta = loss_adv - loss
  history = history + [delta[delta > 0]]
  values = np.concatenate(history[-window:])
  mu = values.mean() if values.size else np.nan
  sd = values.std(ddof=1) if values.size >= 2 else np.nan  # torch.std is unbiased.
  with np.errstate(invalid="ignore", divide="ignore"):
    literal = 1 + (delta - mu) / sd * (delta > mu)
  if values.size < 2 or sd == 0:
    weights = np.ones(n)               # The documented guard.
  else:
    weights = literal
  mask = delta > 0
  sel = np.where(mask, loss_adv, loss)
  final = np.mean(weights * sel)
  xs = np.where(mask[:, None], xm_adv, xm)
  ts = np.where(mask[:, None], ty_adv, ty)
  r = weights[:, None] * (_softmax(xs @ w + b) - ts) / n
  return final, weights, mask, (xs.T @ r, r.sum(0)), history, literal


def _amp_steps():
  """Draws for 8 steps: no positive delta, one, then random ones (the window slides)."""
  rng = np.random.default_rng(7)
  steps = [(rng.uniform(0.2, 0.8, B), np.arange(B)),                  # All self-paired: g = 0.
           (rng.uniform(0.2, 0.8, B), np.array([1, 1, 2, 3, 4, 5]))]  # Only example 0 moves.
  steps += [(rng.uniform(0.05, 0.95, B), rng.permutation(B)) for _ in range(6)]
  return steps


def test_amp_released_against_numpy_over_steps():
  apply, params, x, y = _problem()
  w, b, xn, t = _np(params, x, y)
  eps = 3.0
  history = []
  variables = None
  reweighted = 0
  for step, (lam, perm) in enumerate(_amp_steps()):
    obj = amp.amp(FixedDraw(_base(), tuple(lam), tuple(perm)), eps=eps, variant="released")
    if variables is None:
      variables = {"params": params, **obj.init(x)}
      assert variables["amp"]["window"].shape == (5, 3)

    def loss_fn(p, v):
      return obj(apply, {**v, "params": p}, x, y, jax.random.key(step))

    (loss, (state, metrics)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        variables["params"], variables)
    ref, weights, mask, (dw, db), history, literal = _amp_released_step(
        w, b, xn, t, lam.astype(np.float32).astype(np.float64), perm, eps, history)
    positives = sum(h.size for h in history[-5:])
    if step == 0:
      assert positives == 0
    if step == 1:
      assert positives == 1 and history[-1].size == 1
    if positives < 2:  # The released code's loss is NaN here; ours is AMP without re-weighting.
      assert not np.all(np.isfinite(literal))
      np.testing.assert_array_equal(weights, 1.0)
    reweighted += int(np.any(weights > 1.0))
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss), ref, rtol=2e-5)
    np.testing.assert_allclose(grads["w"], dw, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads["b"], db, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(metrics["amp_mask_frac"]), mask.mean(), atol=1e-6)
    np.testing.assert_allclose(float(metrics["amp_weight_max"]), weights.max(), rtol=1e-4)
    assert float(metrics["amp_window_count"]) == positives
    # The window: one row per step (count, mean, squared deviations), oldest first.
    window = np.asarray(state["amp"]["window"])
    for row, h in zip(window[::-1], history[::-1]):
      assert row[0] == h.size
      if h.size:
        np.testing.assert_allclose(row[1], h.mean(), rtol=1e-4)
        np.testing.assert_allclose(row[2], np.sum((h - h.mean()) ** 2), rtol=1e-3, atol=1e-9)
    variables = {**variables, **state}
  assert reweighted >= 3  # The re-weighting was exercised, not only the guard.
  assert len(history) > 5  # The window slid past its first steps.


def test_amp_released_guard_and_window_moments():
  """A window with two equal positives (std 0) or fewer than two: weights 1, nothing NaN."""
  delta = jnp.asarray([0.5, 0.5, -0.1, 0.0, 0.7])
  for window in (jnp.zeros((5, 3)), jnp.zeros((5, 3)).at[-1].set(jnp.asarray([1.0, 0.5, 0.0])),
                 jnp.zeros((5, 3)).at[-1].set(jnp.asarray([2.0, 0.5, 0.0]))):
    count, mean, std = amp.window_moments(window)
    assert np.isfinite([float(count), float(mean), float(std)]).all()
    np.testing.assert_array_equal(amp.released_weights(delta, count, mean, std), 1.0)
  # Rows merge to the moments of the values they summarise (NumPy, unbiased std).
  rng = np.random.default_rng(3)
  groups = [rng.exponential(size=k) for k in (0, 3, 1, 4, 2)]
  rows = [[g.size, g.mean() if g.size else 0.0, np.sum((g - g.mean()) ** 2) if g.size else 0.0]
          for g in groups]
  count, mean, std = amp.window_moments(jnp.asarray(rows, jnp.float32))
  values = np.concatenate(groups)
  assert float(count) == values.size
  np.testing.assert_allclose([float(mean), float(std)], [values.mean(), values.std(ddof=1)],
                             rtol=1e-5)


def test_amp_paper_variant_unchanged():
  apply, params, x, y = _problem()
  base = _base()
  default, paper = amp.amp(base), amp.amp(base, variant="paper")
  assert default.variant == "paper" and amp.Amp(base).variant == "paper"
  assert default.init(x) == {}
  outs = []
  for obj in (default, paper):
    f = jax.value_and_grad(lambda p, o=obj: o(apply, {"params": p}, x, y, jax.random.key(1)),
                           has_aux=True)
    (loss, (state, metrics)), grads = f(params)
    outs.append((loss, state, metrics, grads))
  jax.tree_util.tree_map(np.testing.assert_array_equal, outs[0], outs[1])
  assert "amp_weight_max" not in outs[0][2]
  released = amp.amp(base, variant="released")
  v = {"params": params, **released.init(x)}
  loss_r, _ = released(apply, v, x, y, jax.random.key(1))
  assert float(loss_r) != float(outs[0][0])


def test_amp_released_max_mode_and_missing_state():
  apply, params, x, y = _problem()
  w, b, xn, t = _np(params, x, y)
  lam, perm = _amp_steps()[3]
  obj = amp.amp(FixedDraw(_base(), tuple(lam), tuple(perm)), eps=3.0, mode="max",
                variant="released")
  assert obj.init(x) == {}
  loss, (state, metrics) = obj(apply, {"params": params}, x, y, jax.random.key(0))
  lam64 = lam.astype(np.float32).astype(np.float64)
  xm = lam64[:, None] * xn + (1 - lam64[:, None]) * xn[perm]
  ty = lam64[:, None] * t + (1 - lam64[:, None]) * t[perm]
  g = np.sum((_softmax(xm @ w + b) - ty) * ((xn - xn[perm]) @ w), axis=1)
  la = np.clip(lam64 + 3.0 * g / B, 0.0, 1.0)
  ref = np.mean(_xent((la[:, None] * xn + (1 - la[:, None]) * xn[perm]) @ w + b,
                      la[:, None] * t + (1 - la[:, None]) * t[perm]))
  np.testing.assert_allclose(float(loss), ref, rtol=2e-5)
  assert "amp" not in state
  full = amp.amp(_base(), variant="released")
  with pytest.raises(ValueError, match="objective.init"):
    full(apply, {"params": params}, x, y, jax.random.key(0))


class _BnNet(nn.Module):
  """Dense + batch norm (training mode) + dropout: examples interact through the statistics."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
    x = nn.Dropout(0.3, deterministic=not train)(nn.relu(x))
    return nn.Dense(C)(x)


def test_amp_released_eps_zero_is_the_base_with_batch_norm():
  """eps = 0: lam' = lam, no positive delta, weights 1: mixup's loss, gradient and statistics."""
  _, _, x, y = _problem()
  apply = adapters.make_apply(_BnNet(), train=True)
  v = _BnNet().init(jax.random.key(0), x)
  base = _base()
  obj = amp.amp(base, eps=0.0, variant="released")
  v_amp = {**v, **obj.init(x)}

  def run(o, variables):
    f = jax.value_and_grad(
        lambda p: o(apply, {**variables, "params": p}, x, y, jax.random.key(4)), has_aux=True)
    return f(variables["params"])

  (loss_b, (state_b, _)), grads_b = run(base, v)
  (loss_a, (state_a, metrics)), grads_a = run(obj, v_amp)
  np.testing.assert_array_equal(loss_a, loss_b)
  chex.assert_trees_all_equal(grads_a, grads_b)
  chex.assert_trees_all_equal(state_a["batch_stats"], state_b["batch_stats"])
  np.testing.assert_array_equal(state_a["amp"]["window"], 0.0)
  assert float(metrics["amp_mask_frac"]) == 0.0 and float(metrics["amp_weight_max"]) == 1.0


def test_mixupe_of_amp_released_returns_the_window():
  apply, params, x, y = _problem()
  lam, perm = _amp_steps()[4]
  inner = amp.amp(FixedDraw(_base(), tuple(lam), tuple(perm)), eps=3.0, variant="released")
  outer = mixupe.mixupe(inner, eta=0.1)
  v = {"params": params, **outer.init(x)}
  assert set(v) == {"params", "amp"}
  loss_a, (state_a, _) = inner(apply, v, x, y, jax.random.key(2))
  _, (state_e, metrics_e) = outer(apply, v, x, y, jax.random.key(2))
  np.testing.assert_allclose(state_e["amp"]["window"], state_a["amp"]["window"], rtol=1e-6)
  assert float(state_e["amp"]["window"][-1, 0]) > 0
  np.testing.assert_allclose(float(metrics_e["loss_mix"]), float(loss_a), rtol=1e-6)


def test_amp_released_window_persists_through_train_step():
  apply, params, x, y = _problem()
  obj = amp.amp(_base(), eps=3.0, variant="released")
  tx = optax.sgd(0.1)
  state = train_step.create_train_state({"params": params, **obj.init(x)}, tx,
                                        jax.random.key(0), ema=False)
  step = jax.jit(lambda s, bt: train_step.train_step(s, bt, objective=obj, apply=apply, tx=tx))
  counts = []
  for _ in range(7):
    state, metrics = step(state, {"inputs": x, "labels": y})
    assert float(metrics["finite"]) == 1.0
    window = np.asarray(state.model_state["amp"]["window"])
    counts.append(window[-1, 0])
    assert float(metrics["amp_window_count"]) == window[:, 0].sum()
  # Each step's row moves up by one; after 5 steps the first ones leave the window.
  np.testing.assert_array_equal(window[:, 0], counts[-5:])


def test_released_stack_by_name_through_train_step():
  """'mixup+amp+mixupe' with both variants released, as a config would build it."""
  apply, params, x, y = _problem()
  obj = methods.get_objective("mixup+amp+mixupe", num_classes=C,
                              amp={"eps": 3.0, "variant": "released"},
                              mixupe={"eta": 0.1, "variant": "released", "threshold": 0.5})
  assert obj.variant == "released" and obj.base.variant == "released"
  tx = optax.sgd(0.1)
  state = train_step.create_train_state({"params": params, **obj.init(x)}, tx,
                                        jax.random.key(0), ema=False)
  step = jax.jit(lambda s, bt: train_step.train_step(s, bt, objective=obj, apply=apply, tx=tx))
  for i in range(3):
    state, metrics = step(state, {"inputs": x, "labels": y})
    assert float(metrics["finite"]) == 1.0
    window = np.asarray(state.model_state["amp"]["window"])
    assert float(metrics["amp_window_count"]) == window[:, 0].sum()
    assert np.all(window[:-1 - i, 0] == 0) and window[-1, 0] > 0
    assert 0.0 <= float(metrics["mixupe_selected_frac"]) <= 1.0


# ----------------------------------------------------------------------------
# MixupE, released (version 3).


def _mixupe_released(w, b, x, t, lam, perm, eta, weight, threshold):
  """(loss, R_rel, eta_hat, q^) of version 3 in NumPy; `eta_hat` can be held for differences."""
  def parts(w, b):
    xm = lam[:, None] * x + (1 - lam[:, None]) * x[perm]
    z = xm @ w + b
    loss_mix = np.mean(lam * _xent(z, t) + (1 - lam) * _xent(z, t[perm]))
    f = x @ w + b
    q = np.sum((t - _softmax(f)) * f, axis=1)   # b = y_onehot - softmax(f): not detached.
    below = q < threshold
    r = weight * np.sum(q[below]) / len(q)       # Divided by the batch size.
    return loss_mix, r, q
  loss_mix, r, q = parts(w, b)
  total = loss_mix - eta * r                     # loss - mixup_eta * loss_new.
  eta_hat = abs(loss_mix) / abs(total)

  def held(w, b):
    lm, rr, _ = parts(w, b)
    return eta_hat * (lm - eta * rr)
  return eta_hat * total, r, eta_hat, q, held


def test_mixupe_released_against_numpy():
  apply, params, x, y = _problem(seed=1)
  w, b, xn, t = _np(params, x, y)
  rng = np.random.default_rng(2)
  lam = rng.uniform(0.1, 0.9, B).astype(np.float32).astype(np.float64)
  perm = rng.permutation(B)
  f = xn @ w + b
  q = np.sort(np.sum((t - _softmax(f)) * f, axis=1))
  threshold = float((q[-2] + q[-1]) / 2)  # The largest q^ is left out.
  alpha, eta = 1.0, 0.5
  weight = 1.0 - (alpha + 1) / (2 * alpha + 1)  # 1 - beta_mean(alpha + 1, alpha).
  ref, r, eta_hat, qs, held = _mixupe_released(w, b, xn, t, lam, perm, eta, weight, threshold)
  below = qs < threshold
  assert np.any(qs[below] > 0) and np.any(qs[below] < 0) and not np.all(below)

  obj = mixupe.mixupe(FixedDraw(_base(), tuple(lam), tuple(perm)), eta=eta,
                      variant="released", threshold=threshold)
  np.testing.assert_allclose(obj.weight, weight, rtol=1e-12)
  f_lib = jax.value_and_grad(lambda p: obj(apply, {"params": p}, x, y, jax.random.key(0)),
                             has_aux=True)
  (loss, (_, metrics)), grads = jax.jit(f_lib)(params)
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["mixupe_r"]), -r, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["mixupe_eta_hat"]), eta_hat, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["mixupe_selected_frac"]), below.mean())
  # The parameter gradient (eta_hat held), by central differences of the NumPy loss.
  h = 1e-6
  flat = np.concatenate([w.ravel(), b])
  unflat = lambda v: held(v[:w.size].reshape(w.shape), v[w.size:])  # noqa: E731
  fd = np.array([(unflat(flat + h * e) - unflat(flat - h * e)) / (2 * h)
                 for e in np.eye(flat.size)])
  np.testing.assert_allclose(grads["w"], fd[:w.size].reshape(w.shape), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grads["b"], fd[w.size:], rtol=1e-4, atol=1e-5)
  # Not the paper's term (eta_hat makes both values |L_mix|: the gradients differ).
  paper = mixupe.mixupe(FixedDraw(_base(), tuple(lam), tuple(perm)), eta=eta)
  (loss_p, (_, metrics_p)), grads_p = jax.jit(jax.value_and_grad(
      lambda p: paper(apply, {"params": p}, x, y, jax.random.key(0)), has_aux=True))(params)
  np.testing.assert_allclose(float(loss_p), float(loss), rtol=1e-6)
  assert float(metrics_p["mixupe_r"]) > 0 > float(metrics["mixupe_r"]) or abs(
      float(metrics_p["mixupe_r"]) - float(metrics["mixupe_r"])) > 1e-3
  assert np.max(np.abs(np.asarray(grads_p["w"]) - np.asarray(grads["w"]))) > 1e-2


def test_mixupe_paper_variant_unchanged():
  apply, params, x, y = _problem()
  base = _base()
  default, paper = mixupe.mixupe(base), mixupe.mixupe(base, variant="paper")
  assert default.variant == "paper"
  outs = [o(apply, {"params": params}, x, y, jax.random.key(1)) for o in (default, paper)]
  jax.tree_util.tree_map(np.testing.assert_array_equal, outs[0], outs[1])
  assert "mixupe_selected_frac" not in outs[0][1][1]


def test_unknown_variants_and_bad_options_are_refused():
  base = _base()
  with pytest.raises(ValueError, match=r"variant must be one of \['paper', 'released'\]"):
    amp.amp(base, variant="published")
  with pytest.raises(ValueError, match=r"variant must be one of \['paper', 'released'\]"):
    mixupe.mixupe(base, variant="v3")
  with pytest.raises(ValueError, match="clip applies to variant='paper' only"):
    amp.amp(base, clip=0.5, variant="released")
  with pytest.raises(ValueError, match="window must be a positive integer"):
    amp.amp(base, variant="released", window=0)
  with pytest.raises(ValueError, match="exact=False"):
    mixupe.mixupe(base, variant="released", exact=True)
  with pytest.raises(ValueError, match="threshold must be a finite number"):
    mixupe.mixupe(base, variant="released", threshold=float("nan"))


def test_config_keys_select_the_released_variants():
  from mixjax import config_utils, from_config
  c = config_utils.base_config()
  c.total_steps = 1
  c = config_utils.apply_overrides(c, ["method=mixup+amp+mixupe", "amp.variant=released",
                                       "amp.window=3", "mixupe.variant=released",
                                       "mixupe.threshold=0.5"])
  config_utils.validate(c)
  obj = from_config.objective(c, c.method, None)
  assert (obj.variant, obj.threshold) == ("released", 0.5)
  assert (obj.base.variant, obj.base.window) == ("released", 3)
  for bad in ("amp.variant=authors", "mixupe.variant=v3", "amp.window=0"):
    with pytest.raises(ValueError, match=bad.split("=")[0]):
      config_utils.validate(config_utils.apply_overrides(c, [bad]))
