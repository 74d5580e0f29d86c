"""AMP: the lambda gradient against finite differences, the Min step, modes, split models."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_testlib as lib

from mixjax import adapters, amp, losses, methods, mixupe, objectives, policies


def _xent64(logits, targets):
  """Cross-entropy in the outputs' precision (the library's casts to float32)."""
  return -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)


def _f64(tree):
  return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def _mix64(x, perm, lam):
  lam = lam.reshape(lam.shape + (1,) * (x.ndim - 1))
  return lam * x + (1 - lam) * x[perm]


class CNN(nn.Module):
  """Conv + batch norm (training mode) + dropout: examples interact through the statistics."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    x = nn.Dropout(0.3, deterministic=not train)(nn.relu(x))
    return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


def _model64(kind):
  """(apply_fn with float64 input/hidden mixing, variables, inputs, point) for the FD checks."""
  rng = np.random.default_rng(0)
  if kind == "cnn_bn":
    x = rng.normal(size=(6, 5, 5, 2))
    v = _f64(CNN().init(jax.random.key(0), jnp.asarray(x, jnp.float32)))

    def apply(variables, inputs, *, key=None, mix=None):
      if mix is not None:
        inputs = _mix64(inputs, mix.perm, mix.lam)
      out, state = CNN().apply(variables, inputs, train=True, rngs={"dropout": key},
                               mutable=["batch_stats"])
      return out, dict(state)
    return apply, v, jnp.asarray(x), None
  x = rng.normal(size=(6, 4))
  sizes = {"linear": [4, 3], "mlp": [4, 8, 8, 3], "hidden": [4, 8, 8, 3]}[kind]
  params = [(rng.normal(size=(a, b)) / np.sqrt(a), rng.normal(size=b) * 0.1)
            for a, b in zip(sizes[:-1], sizes[1:])]

  def apply(variables, inputs, *, key=None, mix=None):
    h = inputs
    if mix is not None and mix.point is None:
      h = _mix64(h, mix.perm, mix.lam)
    for i, (w, b) in enumerate(variables["params"]):
      h = h @ w + b
      if i < len(variables["params"]) - 1:
        h = jnp.tanh(h)
      if i == 0 and mix is not None and mix.point == "layer0":
        h = _mix64(h, mix.perm, mix.lam)
    return h, {}
  return apply, {"params": _f64(params)}, jnp.asarray(x), "layer0" if kind == "hidden" else None


@pytest.mark.parametrize("kind", ["linear", "mlp", "cnn_bn", "hidden"])
def test_lambda_gradient_equals_central_differences(kind):
  with jax.enable_x64(True):
    apply, v, x, point = _model64(kind)
    b = x.shape[0]
    y = jnp.arange(b) % 3
    base = objectives.mixup(policies.untied_mixup(0.7, 1.3), num_classes=3, point=point,
                            loss_fn=_xent64)
    draw = base.draw(jax.random.key(1), x, y)
    lam = jnp.asarray(draw.coeffs.lam_x, jnp.float64)
    key = jax.random.key(2)
    obj = amp.amp(base)
    loss_fn = obj.lambda_loss(apply, v, x, objectives.Prepared(draw, key, None, {}))
    grad, per_example = jax.jit(lambda l: amp.lam_grad(loss_fn, l))(lam)

    def reference(l):  # Independent: explicit mixing and interpolated cross-entropy, summed.
      out, _ = apply(v, x, key=key, mix=adapters.MixSpec(point, l, draw.perm))
      ly = draw.coeffs.lam_y
      return jnp.sum(ly * _xent64(out, draw.targets_a) + (1 - ly) * _xent64(out, draw.targets_b))

    h = 1e-6
    fd = np.array([(reference(lam.at[i].add(h)) - reference(lam.at[i].add(-h))) / (2 * h)
                   for i in range(b)])
    assert grad.dtype == jnp.float64
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)
    assert np.abs(fd).max() > 1e-2  # Not a vacuous check.
    # The labels keep their coefficient: moving only lam_x changes the loss.
    ly = draw.coeffs.lam_y
    out, _ = apply(v, x, key=key, mix=adapters.MixSpec(point, lam, draw.perm))
    np.testing.assert_allclose(
        per_example, ly * _xent64(out, draw.targets_a) + (1 - ly) * _xent64(out, draw.targets_b),
        rtol=1e-10)


def _cnn_setup(b=8):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(b, 5, 5, 2)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, b))
  v = CNN().init(jax.random.key(0), x)
  return adapters.make_apply(CNN(), train=True), v, x, y


def _value_and_grad(obj, apply, v, x, y, key=jax.random.key(3)):
  f = jax.value_and_grad(lambda p: obj(apply, {**v, "params": p}, x, y, key), has_aux=True)
  (loss, (state, metrics)), grads = f(v["params"])
  return loss, state, metrics, grads


def test_eps_zero_equals_mixup():
  """CNN with batch norm (training mode) and dropout: same loss, gradient and statistics."""
  apply, v, x, y = _cnn_setup()
  base = objectives.mixup(policies.mixup(1.0), num_classes=3)
  ref = _value_and_grad(base, apply, v, x, y)
  for mode in ("full", "max", "rand"):
    got = _value_and_grad(amp.amp(base, eps=0.0, mode=mode), apply, v, x, y)
    # Bit for bit: the final pass is mixup's pass at the same lam, key and variables.
    np.testing.assert_array_equal(got[0], ref[0], err_msg=mode)
    chex.assert_trees_all_equal(got[3], ref[3])  # Parameter gradient.
    chex.assert_trees_all_equal(got[1], ref[1])  # Batch statistics: one update.
    if mode == "full":
      assert float(got[2]["amp_mask_frac"]) == 0.0 and float(got[2]["amp_dlam"]) == 0.0
      assert float(got[2]["amp_grad_abs"]) > 0
  # Also inside jit, where XLA compiles the whole step as one program (small model).
  fn, mv, mx, my = _mlp()
  mlp = adapters.make_apply_fn(fn)
  jit_ref = jax.jit(lambda: _value_and_grad(base, mlp, mv, mx, my))()
  jit_got = jax.jit(lambda: _value_and_grad(amp.amp(base, eps=0.0), mlp, mv, mx, my))()
  np.testing.assert_allclose(jit_got[0], jit_ref[0], rtol=1e-6)
  # The two programs fuse differently, so XLA may sum in another order: allow float32
  # rounding at the scale of the largest gradient entry (~0.2), not of each entry.
  chex.assert_trees_all_close(jit_got[3], jit_ref[3], rtol=1e-5, atol=2e-6)
  assert float(jit_got[2]["amp_mask_frac"]) == 0.0
  # eps > 0 moves the loss up (ascent on lam) from the same draw.
  up = _value_and_grad(amp.amp(base, eps=0.05), apply, v, x, y)
  assert float(up[0]) > float(ref[0]) and float(up[2]["amp_mask_frac"]) > 0


def _mlp(b=8):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(b, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, b))
  params = {"w1": jnp.asarray(rng.normal(size=(3, 16)), jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32) * 0.3}
  fn = lambda p, z: jnp.sin(3 * z @ p["w1"]) @ p["w2"]  # noqa: E731  (wiggly in lam)
  return fn, {"params": params}, x, y


def test_min_step_mask_and_parameter_gradient_against_explicit_computation():
  fn, v, x, y = _mlp()
  apply = adapters.make_apply_fn(fn)
  base = objectives.mixup(policies.mixup(1.0), num_classes=3)
  obj = amp.amp(base, eps=0.4)  # Large steps overshoot: some L' < L.
  key = jax.random.key(7)
  loss, _, metrics, grads = _value_and_grad(obj, apply, v, x, y, key)

  # Explicit per-example reference, recomputed from scratch.
  k_mix, _ = jax.random.split(key)
  draw = base.draw(k_mix, x, y)
  lam, perm, ly = draw.coeffs.lam_x, draw.perm, draw.coeffs.lam_y
  ya, yb = draw.targets_a, draw.targets_b

  def per_example(p, lx):
    out = fn(p, lx[:, None] * x + (1 - lx[:, None]) * x[perm])
    return ly * losses.softmax_cross_entropy(out, ya) + (1 - ly) * losses.softmax_cross_entropy(
        out, yb)

  g = jax.grad(lambda lx: per_example(v["params"], lx).sum())(lam)
  lam_adv = jnp.clip(lam + 0.4 * jnp.clip(g, -1, 1), 0, 1)
  l0, l1 = per_example(v["params"], lam), per_example(v["params"], lam_adv)
  mask = np.asarray(l1 > l0)
  assert 0 < mask.sum() < len(mask), mask  # The crafted case has both outcomes.
  np.testing.assert_allclose(metrics["amp_mask_frac"], mask.mean())
  lam_final = obj.prepare(apply, v, x, y, key).draw.coeffs.lam_x  # lam' exactly where L' > L.
  np.testing.assert_allclose(lam_final, np.where(mask, lam_adv, lam), rtol=1e-6)
  np.testing.assert_allclose(metrics["amp_loss"], l0.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["amp_loss_adv"], l1.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["amp_grad_abs"], jnp.abs(g).mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["amp_dlam"], (lam_adv - lam).mean(), rtol=1e-5, atol=1e-7)
  m = jnp.asarray(mask, jnp.float32)
  final = lambda p: jnp.mean((1 - m) * per_example(p, lam) + m * per_example(p, lam_adv))  # noqa
  np.testing.assert_allclose(loss, final(v["params"]), rtol=1e-5)
  chex.assert_trees_all_close(grads, jax.grad(final)(v["params"]), rtol=1e-4, atol=1e-6)
  # 'max' always takes lam'.
  loss_max, _, metrics_max, grads_max = _value_and_grad(amp.amp(base, eps=0.4, mode="max"),
                                                        apply, v, x, y, key)
  np.testing.assert_allclose(loss_max, per_example(v["params"], lam_adv).mean(), rtol=1e-5)
  assert float(metrics_max["amp_mask_frac"]) == 1.0
  chex.assert_trees_all_close(
      grads_max, jax.grad(lambda p: per_example(p, lam_adv).mean())(v["params"]),
      rtol=1e-4, atol=1e-6)
  # lam' stays in [0, 1] even with a huge step.
  lam_final = np.asarray(jax.jit(lambda: amp.amp(base, eps=50.0, mode="max").prepare(
      apply, v, x, y, key).draw.coeffs.lam_x)())
  assert lam_final.min() >= 0.0 and lam_final.max() <= 1.0
  np.testing.assert_allclose(lam_final, jnp.clip(lam + 50 * jnp.clip(g, -1, 1), 0, 1), atol=1e-6)
  assert np.isin(lam_final, [0.0, 1.0]).sum() >= 4


class Split(nn.Module):
  """A model with an encoder (conv, batch norm, pooling) and a head with dropout."""

  def setup(self):
    self.conv = nn.Conv(4, (3, 3))
    self.bn = nn.BatchNorm()
    self.enc = nn.Dense(8)
    self.drop = nn.Dropout(0.3)
    self.out = nn.Dense(3)

  def encode(self, x, train: bool = False):
    x = nn.relu(self.bn(self.conv(x), use_running_average=not train))
    return self.enc(x.mean(axis=(1, 2)))

  def head(self, h, train: bool = False):
    return self.out(self.drop(nn.relu(h), deterministic=not train))

  def __call__(self, x, train: bool = False):
    return self.head(self.encode(x, train), train)


def test_split_model_runs_encoder_once_and_equals_intercept_path():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(8, 5, 5, 2)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 8))
  v = Split().init(jax.random.key(0), x)
  split = adapters.make_split_apply(Split(), point="enc")
  calls = []

  def counting_encode(variables, inputs, *, key=None):
    calls.append(1)
    return split.encode(variables, inputs, key=key)

  counted = adapters.SplitApply(counting_encode, split.head, "enc")
  whole = adapters.make_apply(Split(), train=True)  # Intercepts the 'enc' submodule.
  base = objectives.mixup(policies.mixup(1.0), num_classes=3, point="enc")
  obj = amp.amp(base, eps=0.05)
  fast = _value_and_grad(obj, counted, v, x, y)
  assert len(calls) == 1  # One encoder forward in the traced program.
  slow = _value_and_grad(obj, whole, v, x, y)
  np.testing.assert_allclose(fast[0], slow[0], rtol=1e-5)
  chex.assert_trees_all_close(fast[3], slow[3], rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(fast[1], slow[1], rtol=1e-5)
  for k in ("amp_grad_abs", "amp_mask_frac", "amp_loss", "amp_loss_adv"):
    np.testing.assert_allclose(fast[2][k], slow[2][k], rtol=1e-5, err_msg=k)
  # The SplitApply is an ordinary ApplyFn too (mixup at its point, or at the input).
  loss_split, _ = base(split, v, x, y, jax.random.key(3))
  loss_whole, _ = base(whole, v, x, y, jax.random.key(3))
  np.testing.assert_allclose(loss_split, loss_whole, rtol=1e-5)
  with pytest.raises(ValueError, match="mixes at its inputs"):
    objectives.mixup(policies.mixup(1.0), num_classes=3, point="conv")(
        split, v, x, y, jax.random.key(3))
  with pytest.raises(ValueError, match="no method"):
    adapters.make_split_apply(CNN())
  # Plain functions.
  f = adapters.split_apply_fn(lambda p, x: jnp.tanh(x @ p["a"]), lambda p, h: h @ p["b"], "h")
  pv = {"params": {"a": jnp.ones((3, 4)) * 0.1, "b": jnp.ones((4, 3))}}
  xs = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  hb = objectives.mixup(policies.mixup(1.0), num_classes=3, point="h")
  loss, (state, _) = amp.amp(hb)(f, pv, xs, y, jax.random.key(0))
  assert state == {} and np.isfinite(loss)


def test_arguments_composition_and_config():
  base = objectives.mixup(policies.dat(0.5), num_classes=3)
  with pytest.raises(ValueError, match="mode"):
    amp.amp(base, mode="min")
  for bad in (-0.1, float("nan"), "x"):
    with pytest.raises(ValueError, match="eps"):
      amp.amp(base, eps=bad)
  with pytest.raises(ValueError, match="wraps an objective that mixes"):
    amp.amp(objectives.erm(num_classes=3))
  obj = methods.get_objective("untied+amp", num_classes=3, alpha=0.5, beta=1.5,
                                 amp={"eps": 0.01, "mode": "max"})
  assert isinstance(obj, amp.Amp) and obj.eps == 0.01 and obj.mode == "max"
  cos = methods.get_objective("amp", num_classes=3, loss="cosine", cosine_dim=4)
  assert cos.to_logits(jnp.ones((2, 4))).shape == (2, 3)
  # DAT keeps the label coefficient at 1 while lam_x moves; per-batch lam becomes per-example.
  fn, v, x, y = _mlp()
  apply = adapters.make_apply_fn(fn)
  for policy in (policies.dat(0.5), policies.mixup(0.5, per_example=False)):
    b = objectives.mixup(policy, num_classes=3)
    prepared = amp.amp(b, eps=0.3).prepare(apply, v, x, y, jax.random.key(0))
    drawn = b.draw(jax.random.split(jax.random.key(0))[0], x, y).coeffs
    assert prepared.draw.coeffs.lam_x.shape == (8,)
    assert float(jnp.abs(prepared.draw.coeffs.lam_x - drawn.lam_x).max()) > 0
    np.testing.assert_array_equal(prepared.draw.coeffs.lam_y, drawn.lam_y)


def test_nnx_model():
  from flax import nnx

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.hidden = nnx.Linear(3, 8, rngs=rngs)
      self.bn = nnx.BatchNorm(8, rngs=rngs)
      self.drop = nnx.Dropout(0.2, rngs=rngs)
      self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      return self.out(self.drop(jax.nn.relu(self.bn(self.hidden(x)))))

  _, _, x, y = _mlp()
  apply, variables = adapters.make_nnx_apply(Net(nnx.Rngs(0, dropout=1)))
  base = objectives.mixup(policies.mixup(1.0), num_classes=3, point="hidden")
  ref = _value_and_grad(base, apply, variables, x, y)
  got = _value_and_grad(amp.amp(base, eps=0.0), apply, variables, x, y)
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
  chex.assert_trees_all_close(got[3], ref[3], rtol=1e-5, atol=1e-6)
  moved = _value_and_grad(amp.amp(base, eps=0.1, mode="max"), apply, variables, x, y)
  assert float(moved[0]) > float(ref[0])
  # MixupE with a separate clean pass (the concatenated pass's batch-norm and
  # dropout handling is for linen modules).
  both = _value_and_grad(mixupe.mixupe(amp.amp(base, eps=0.1, mode="max"), clean_pass="separate"),
                         apply, variables, x, y)
  np.testing.assert_allclose(both[2]["loss_mix"], moved[0], rtol=1e-6)
  chex.assert_trees_all_close(both[1], moved[1], rtol=1e-6)
  assert float(both[2]["mixupe_r"]) > 0


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = lambda name: nn.BatchNorm(use_running_average=not train, name=name)  # noqa: E731
    y = nn.relu(norm("bn1")(nn.Conv(4, (3, 3), name="conv1")(x)))
    return nn.relu(x + norm("bn2")(nn.Conv(4, (3, 3), name="conv2")(y)))


class ResCNN(nn.Module):
  """A small residual CNN (batch norm, dropout), unmodified: mixing point 'block1' mid-way."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), name="stem")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="stem_bn")(x))
    x = _Block(name="block0")(x, train)
    x = _Block(name="block1")(x, train)
    x = nn.Dropout(0.3, deterministic=not train)(x)
    x = _Block(name="block2")(x, train)
    return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


def test_intercepted_hidden_point_lambda_gradient():
  """d L / d lam through the layers above the point only: the whole-model passes' and FD's."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(6, 6, 6, 2)))
    y = jnp.arange(6) % 3
    v = _f64(ResCNN().init(jax.random.key(0), jnp.asarray(x, jnp.float32)))
    apply = adapters.make_apply(ResCNN(), train=True)
    base = objectives.mixup(policies.untied_mixup(0.7, 1.3), num_classes=3, point="block1",
                            loss_fn=_xent64)
    draw = base.draw(jax.random.key(1), x, y)
    lam = jnp.asarray(draw.coeffs.lam_x, jnp.float64)
    key = jax.random.key(2)
    obj = amp.amp(base)
    prepared = objectives.Prepared(draw, key, None, {})
    encoded = apply.run_encoder(v, x, key, "block1")
    lib.assert_lambda_gradient(obj.lambda_loss(apply, v, x, prepared._replace(encoded=encoded)),
                               obj.lambda_loss(lib.whole_model_passes(apply), v, x, prepared), lam)


def test_intercepted_hidden_point_equals_whole_model_passes():
  """Loss, parameter gradient, batch statistics and metrics; fewer FLOPs."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(8, 6, 6, 2)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 8))
  apply = adapters.make_apply(ResCNN(), train=True)
  obj = amp.amp(objectives.mixup(policies.mixup(1.0), num_classes=3, point="block1"), eps=0.5)
  v = ResCNN().init(jax.random.key(0), x)
  state, metrics = lib.assert_fast_path_equals_whole_model(
      obj, apply, lib.whole_model_passes(apply), v, x, y)
  assert 0 < float(metrics["amp_mask_frac"]) < 1
  # Every statistic moved once: the final pass's, below the point too.
  mixup = objectives.mixup(policies.mixup(1.0), num_classes=3, point="block1")
  mixed = jax.jit(lambda vs: mixup(apply, vs, x, y, jax.random.key(3))[1][0])(v)
  stem = lambda s: s["batch_stats"]["stem_bn"]["mean"]  # noqa: E731
  assert not np.allclose(stem(state), stem(v))
  np.testing.assert_allclose(stem(state), stem(mixed), rtol=1e-5)


@pytest.mark.parametrize("rho", [1.0, 0.5])
def test_mixupe_concatenated_pass_starts_at_intercepted_point(rho):
  """MixupE over AMP: [mixed; clean] rows run the layers above 'block1' only (block2, head)."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(8, 6, 6, 2)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 8))
  base = objectives.mixup(policies.mixup(1.0), num_classes=3, point="block1")
  lib.assert_concat_pass_starts_at_point(
      mixupe.mixupe(amp.amp(base, eps=0.5), rho=rho), adapters.make_apply(ResCNN(), train=True),
      ResCNN().init(jax.random.key(0), x), x, y, matmuls_above=3)


class _DropBelow(nn.Module):
  """Dropout called by the root below the point 'enc', batch norm above it."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dropout(0.5, deterministic=not train)(nn.Dense(6)(x))
    x = nn.BatchNorm(use_running_average=not train)(nn.Dense(6, name="enc")(x))
    return nn.Dense(3)(nn.Dropout(0.5, deterministic=not train)(x))


def test_mixupe_concatenated_pass_routes_only_the_layers_above_the_point():
  """Below the point the calls are replayed before MixupE's row routing sees them.

  (Routed first, the dropout below would run twice, on the mixed and the clean
  rows, and take two replayed values.) The mixed rows equal whole-model
  passes'; the clean rows keep their examples' encoder masks below the point.
  """
  x = jnp.asarray(np.random.default_rng(3).normal(size=(8, 5)), jnp.float32)
  y = jnp.arange(8) % 3
  v = _DropBelow().init(jax.random.key(0), x)
  apply = adapters.make_apply(_DropBelow(), train=True)
  base = objectives.mixup(policies.mixup(1.0), num_classes=3, point="enc")
  obj = mixupe.mixupe(amp.amp(base, eps=0.5), rho=0.5)
  run = lambda a: jax.jit(lambda vs: obj(a, vs, x, y, jax.random.key(1)))(v)  # noqa: E731
  loss, (state, metrics) = run(apply)
  _, (state_ref, metrics_ref) = run(lib.whole_model_passes(apply))
  for k in ("loss_mix", "amp_loss", "amp_mask_frac"):
    np.testing.assert_allclose(metrics[k], metrics_ref[k], rtol=1e-5, err_msg=k)
  chex.assert_trees_all_close(state, state_ref, rtol=1e-5, atol=1e-6)
  assert np.isfinite(float(loss)) and float(metrics["mixupe_r"]) > 0


class _Twice(nn.Module):
  """One submodule called twice: the second call sees the mixed first one, so no split."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    shared = nn.Dense(4, name="shared")
    return nn.Dense(3)(shared(jnp.tanh(shared(x))))


def test_intercepted_point_called_twice_runs_whole_model():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)), jnp.float32)
  y = jnp.arange(8) % 3
  v = _Twice().init(jax.random.key(0), x)
  apply = adapters.make_apply(_Twice(), train=True)
  assert apply.run_encoder(v, x, None, "shared") is None
  obj = amp.amp(objectives.mixup(policies.mixup(1.0), num_classes=3, point="shared"), eps=0.5)
  got = obj(apply, v, x, y, jax.random.key(1))
  ref = obj(lib.whole_model_passes(apply), v, x, y, jax.random.key(1))
  chex.assert_trees_all_close(got, ref, rtol=1e-6)
  with pytest.raises(ValueError, match="No submodule at path 'nowhere'"):
    apply.run_encoder(v, x, None, "nowhere")


class _Bf16Mlp(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.Dense(8, dtype=jnp.bfloat16, name="enc")(x))
    return nn.Dense(3, dtype=jnp.bfloat16, name="head")(h)


def test_output_dtype_casts_every_pass_and_keeps_the_split_path():
  """train.py's f32 outputs of a bf16 model: AMP at a hidden point still runs the encoder once."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)), jnp.float32)
  y = jnp.arange(8) % 3
  v = _Bf16Mlp().init(jax.random.key(0), x)
  plain = adapters.make_apply(_Bf16Mlp(), train=True)
  apply = adapters.make_apply(_Bf16Mlp(), train=True, output_dtype=jnp.float32)
  assert plain(v, x)[0].dtype == jnp.bfloat16 and apply(v, x)[0].dtype == jnp.float32
  np.testing.assert_array_equal(apply(v, x)[0], plain(v, x)[0].astype(jnp.float32))
  obj = amp.amp(objectives.mixup(policies.mixup(1.0), num_classes=3, point="enc"), eps=0.5)
  assert obj.fast_path(apply)
  encoded = apply.run_encoder(v, x, None, "enc")
  spec = adapters.MixSpec("enc", jnp.full((8,), 0.3), jnp.arange(8)[::-1])
  assert apply.run_head(encoded, None, spec)[0].dtype == jnp.float32
  loss, (_, metrics) = jax.jit(lambda vs: obj(apply, vs, x, y, jax.random.key(1)))(v)
  assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
