"""Objectives compose by protocol: a user's wrapper, ERM + MixupE, and the refused orders."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixjax import adapters, amp, losses, methods, mixupe, objectives, policies, sampling


# A user's wrapper, written against the protocol only (about 20 lines).
@dataclasses.dataclass(frozen=True)
class ConfidencePenalty(objectives.Wrapper):
  """Adds `-beta * H(softmax(outputs))` to each example's loss (Pereyra et al. 2017)."""
  beta: float = 0.1

  def per_example(self, outputs, draw):
    p = jax.nn.log_softmax(outputs.astype(jnp.float32))
    entropy = -jnp.sum(jnp.exp(p) * p, axis=-1)
    return self.base.per_example(outputs, draw) - self.beta * entropy


def _setup(b=8):
  rng = np.random.default_rng(0)
  w1 = jnp.asarray(rng.normal(size=(6, 5)) * 0.7, jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(5, 3)) * 0.7, jnp.float32)
  fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]  # noqa: E731
  x = jnp.asarray(rng.normal(size=(b, 6)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, b))
  return fn, {"params": {"w1": w1, "w2": w2}}, x, y


def _entropy(f):
  p = jax.nn.softmax(f)
  return -jnp.sum(p * jnp.log(p), -1)


def test_user_wrapper_is_an_objective_and_composes_with_amp_and_mixupe():
  fn, v, x, y = _setup()
  apply = adapters.make_apply_fn(fn)
  key = jax.random.key(3)
  base = objectives.mixup(policies.mixup(0.5), num_classes=3)
  pen = ConfidencePenalty(base, beta=0.3)
  assert isinstance(pen, objectives.Objective) and pen.policy is base.policy

  # penalty(mixup) against an explicit re-computation.
  loss, (_, metrics) = pen(apply, v, x, y, key)
  draw = base.draw(jax.random.split(key)[0], x, y)
  lx, ly, perm = draw.coeffs.lam_x, draw.coeffs.lam_y, draw.perm
  out = fn(v["params"], lx[:, None] * x + (1 - lx[:, None]) * x[perm])
  ref = (ly * losses.softmax_cross_entropy(out, draw.targets_a)
         + (1 - ly) * losses.softmax_cross_entropy(out, draw.targets_b) - 0.3 * _entropy(out))
  np.testing.assert_allclose(loss, ref.mean(), rtol=1e-6)
  assert "lam_mean" in metrics

  # amp(penalty(m)) with eps = 0 is penalty(m); with eps > 0 AMP moves lam on the penalised loss.
  np.testing.assert_allclose(amp.amp(pen, eps=0.0)(apply, v, x, y, key)[0], loss, rtol=1e-6)
  prep = amp.amp(pen, eps=0.5, mode="max").prepare(apply, v, x, y, key)
  g = jax.grad(lambda l: pen.losses(apply, v, x, objectives.with_lam_x(prep, l))[0].sum())(lx)
  np.testing.assert_allclose(prep.draw.coeffs.lam_x, jnp.clip(lx + 0.5 * jnp.clip(g, -1, 1), 0, 1),
                             rtol=1e-6)
  # penalty(amp(m)): the penalty on AMP's final pass.
  outer = ConfidencePenalty(amp.amp(base, eps=0.5, mode="max"), beta=0.3)
  lam_adv = prep.draw.coeffs.lam_x
  inner = amp.amp(base, eps=0.5, mode="max").prepare(apply, v, x, y, key).draw.coeffs.lam_x
  out = fn(v["params"], inner[:, None] * x + (1 - inner[:, None]) * x[perm])
  ref = (ly * losses.softmax_cross_entropy(out, draw.targets_a)
         + (1 - ly) * losses.softmax_cross_entropy(out, draw.targets_b) - 0.3 * _entropy(out))
  np.testing.assert_allclose(outer(apply, v, x, y, key)[0], ref.mean(), rtol=1e-6)
  assert not np.allclose(lam_adv, inner)  # The penalty changed AMP's direction.

  # mixupe(penalty(m)) with eta = 0 is penalty(m); with eta > 0 it adds R on the clean pass.
  np.testing.assert_allclose(mixupe.mixupe(pen, eta=0.0)(apply, v, x, y, key)[0], loss,
                             rtol=1e-6)
  both = mixupe.mixupe(amp.amp(pen, eps=0.01), eta=0.5)
  total, (_, m) = both(apply, v, x, y, key)
  assert np.isfinite(total) and float(m["mixupe_r"]) > 0 and "amp_mask_frac" in m


def test_erm_plus_mixupe_is_table_7():
  """mixupe(erm): eta_hat * (L_erm + eta * E_{D_lam}[1 - lam] * mean |q^|), by hand."""
  fn, v, x, y = _setup()
  apply = adapters.make_apply_fn(fn)
  obj = mixupe.mixupe(objectives.erm(num_classes=3), alpha=1.0, eta=0.5)
  assert obj.weight == sampling.expected_one_minus_lam(1.0)
  loss, (_, metrics) = obj(apply, v, x, y, jax.random.key(0))
  f = fn(v["params"], x)
  t = jax.nn.one_hot(y, 3)
  l_erm = losses.softmax_cross_entropy(f, t).mean()
  q = jnp.sum((t - jax.nn.softmax(f)) * f, -1)
  r = sampling.expected_one_minus_lam(1.0) * jnp.abs(q).mean()
  total = l_erm + 0.5 * r
  np.testing.assert_allclose(metrics["mixupe_r"], r, rtol=1e-6)
  np.testing.assert_allclose(loss, jnp.abs(l_erm) / jnp.abs(total) * total, rtol=1e-6)
  via_name = methods.get_objective("erm+mixupe", num_classes=3, alpha=1.0,
                                   mixupe={"eta": 0.5})
  np.testing.assert_allclose(via_name(apply, v, x, y, jax.random.key(0))[0], loss, rtol=1e-6)
  # Separate clean pass: the same numbers (no batch norm, no dropout here).
  sep = mixupe.mixupe(objectives.erm(num_classes=3), alpha=1.0, eta=0.5, clean_pass="separate")
  np.testing.assert_allclose(sep(apply, v, x, y, jax.random.key(0))[0], loss, rtol=1e-6)


def test_refused_orders_say_which_order_works():
  base = objectives.mixup(policies.mixup(1.0), num_classes=3)
  with pytest.raises(ValueError, match=r"mixupe\(amp\(base\)\)"):
    amp.amp(mixupe.mixupe(base))
  with pytest.raises(ValueError, match="applied once"):
    mixupe.mixupe(mixupe.mixupe(base))
  with pytest.raises(ValueError, match="applied once"):
    amp.amp(amp.amp(base))
  with pytest.raises(ValueError, match="mixes"):
    amp.amp(objectives.erm(num_classes=3))
  with pytest.raises(ValueError, match="lacks"):
    amp.amp(lambda *a: 0.0)
  with pytest.raises(ValueError, match="'amp' perturbs"):
    methods.parse("erm+amp")
  assert methods.parse("erm+mixupe") == ("erm", ("mixupe",))
  assert methods.parse("mixupe+amp+untied") == ("untied", ("amp", "mixupe"))
  for bad in ("", "mixup+mixup", "amp+amp", "cutmix", "mixup+dat"):
    with pytest.raises(ValueError, match="Unknown method"):
      methods.parse(bad)


def test_nested_settings_change_with_dataclasses_replace():
  """A nested wrapper is a frozen dataclass: change one setting without rebuilding the rest."""
  obj = methods.get_objective("untied+amp+mixupe", num_classes=3, alpha=2.2, beta=0.9)
  changed = dataclasses.replace(obj, base=dataclasses.replace(obj.base, eps=0.01), eta=0.1)
  assert changed.base.eps == 0.01 and changed.eta == 0.1
  assert changed.base.base is obj.base.base and changed.policy is obj.policy
  assert obj.weight == pytest.approx(0.9 / 3.1)  # Read from the untied policy: b / (a + b).


def test_objective_names_an_integer_key():
  fn, v, x, y = _setup()
  for obj in (objectives.erm(num_classes=3), objectives.mixup(policies.mixup(1.0), num_classes=3)):
    with pytest.raises(ValueError, match="key .* must be a PRNG key"):
      obj(adapters.make_apply_fn(fn), v, x, y, 0)
