"""MixupE: q^ vs q, E[1 - lam], the eta_hat trap, clean passes, batch-norm policy, sharding."""

import dataclasses

import chex
import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy import integrate, stats

import train_testlib as lib

from mixjax import adapters, amp, losses, methods, objectives, pairing, policies, sampling, train_step
from mixjax import mixupe


def _relu_net(bias: bool):
  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(size=(5, 16)) / 2, "w2": rng.normal(size=(16, 16)) / 4,
            "w3": rng.normal(size=(16, 3)) / 4}
  if bias:
    params.update(b1=rng.normal(size=16), b2=rng.normal(size=16), b3=rng.normal(size=3))
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)

  def fn(p, x):
    h = jax.nn.relu(x @ p["w1"] + p.get("b1", 0.0))
    h = jax.nn.relu(h @ p["w2"] + p.get("b2", 0.0))
    return h @ p["w3"] + p.get("b3", 0.0)
  return fn, params


def _zero_mean_batch(b=16, d=5, shift=0.0):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(b, d))
  x = x - x.mean(axis=0) + shift
  return jnp.asarray(x, jnp.float32), jnp.asarray(rng.integers(0, 3, b))


def test_q_formulas_against_numpy_and_finite_differences():
  fn, params = _relu_net(bias=True)
  x, y = _zero_mean_batch(shift=0.7)
  t = jax.nn.one_hot(y, 3)
  f = fn(params, x)
  p = np.exp(f - f.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True)
  np.testing.assert_allclose(mixupe.q_approx(losses.softmax_cross_entropy, f, t),
                             np.sum((np.asarray(t) - p) * np.asarray(f), -1), rtol=1e-5)
  sig = 1 / (1 + np.exp(-np.asarray(f)))
  np.testing.assert_allclose(mixupe.q_approx(losses.sigmoid_cross_entropy, f, t),
                             np.sum((np.asarray(t) - sig) * np.asarray(f), -1), rtol=1e-5)
  mean = jnp.asarray(np.random.default_rng(5).normal(size=5), jnp.float32)
  d = mean[None] - x
  _, jd = jax.jvp(lambda z: fn(params, z), (x,), (d,))
  q = mixupe.q_exact(losses.softmax_cross_entropy, f, jd, t)
  h = 1e-3  # (softmax - y)^T (f(x + h d) - f(x - h d)) / 2h, in float64.
  fd = (np.asarray(fn(params, x + h * d), np.float64)
        - np.asarray(fn(params, x - h * d), np.float64)) / (2 * h)
  np.testing.assert_allclose(q, np.sum((p - np.asarray(t)) * fd, -1), rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(mixupe.regularizer(q, sampling.expected_one_minus_lam(0.4, 2.0)),
                             sampling.expected_one_minus_lam(0.4, 2.0) * np.abs(q).mean(),
                             rtol=1e-6)


def _objective_r(fn, params, x, y, **kw):
  obj = mixupe.mixupe(objectives.mixup(policies.mixup(1.0), num_classes=3), **kw)
  _, (_, metrics) = obj(adapters.make_apply_fn(fn), {"params": params}, x, y, jax.random.key(0))
  return float(metrics["mixupe_q_abs"])


def test_approximate_and_exact_q_agree_for_bias_free_relu_on_zero_mean_inputs():
  fn, params = _relu_net(bias=False)
  x, y = _zero_mean_batch()
  zero = jnp.zeros(5, jnp.float32)
  approx = _objective_r(fn, params, x, y)
  assert approx > 0.1
  np.testing.assert_allclose(_objective_r(fn, params, x, y, exact=True, mean=zero), approx,
                             rtol=1e-5)
  np.testing.assert_allclose(_objective_r(fn, params, x, y, exact=True, mean="batch"), approx,
                             rtol=1e-4)
  # With biases (J x != f) or off-centre inputs (E[x'] != 0) they differ.
  fb, pb = _relu_net(bias=True)
  assert abs(_objective_r(fb, pb, x, y, exact=True, mean=zero) - _objective_r(fb, pb, x, y)) > 0.05
  xs, _ = _zero_mean_batch(shift=1.0)
  assert abs(_objective_r(fn, params, xs, y, exact=True, mean="batch")
             - _objective_r(fn, params, xs, y)) > 0.05


@pytest.mark.parametrize("alpha,beta", [(1.0, None), (0.2, 0.2), (0.4, 2.5), (3.0, 0.7)])
def test_expected_one_minus_lam_matches_integral_of_d_lambda(alpha, beta):
  a, b = alpha, alpha if beta is None else beta
  density = lambda l: (a / (a + b) * stats.beta.pdf(l, a + 1, b)  # noqa: E731
                       + b / (a + b) * stats.beta.pdf(l, b + 1, a))
  norm, _ = integrate.quad(density, 0, 1, limit=200)
  value, _ = integrate.quad(lambda l: (1 - l) * density(l), 0, 1, limit=200)
  np.testing.assert_allclose(norm, 1.0, rtol=1e-6)
  np.testing.assert_allclose(sampling.expected_one_minus_lam(alpha, beta), value, rtol=1e-6)


def test_total_loss_gradient_has_the_r_term():
  fn, params = _relu_net(bias=True)
  x, y = _zero_mean_batch(shift=0.3)
  apply = adapters.make_apply_fn(fn)
  base = objectives.mixup(policies.mixup(0.4, 2.0), num_classes=3)
  eta = 0.5
  obj = mixupe.mixupe(base, alpha=0.4, beta=2.0, eta=eta)
  key = jax.random.key(4)
  (loss, (_, metrics)), grads = jax.value_and_grad(
      lambda p: obj(apply, {"params": p}, x, y, key), has_aux=True)(params)

  # Explicit reference.
  k_mix, _ = jax.random.split(key)
  draw = base.draw(k_mix, x, y)

  def l_mix(p):
    return base.losses(apply, {"params": p}, x, objectives.Prepared(draw, None, None, {}))[0].mean()

  def r(p):
    f = fn(p, x)
    q = jnp.sum((draw.targets_a - jax.nn.softmax(f)) * f, -1)
    return sampling.expected_one_minus_lam(0.4, 2.0) * jnp.abs(q).mean()

  lm, rr = l_mix(params), r(params)
  eta_hat = abs(lm) / abs(lm + eta * rr)
  np.testing.assert_allclose(metrics["mixupe_eta_hat"], eta_hat, rtol=1e-5)
  np.testing.assert_allclose(loss, eta_hat * (lm + eta * rr), rtol=1e-5)
  np.testing.assert_allclose(loss, lm, rtol=1e-5)  # The value is L_mix's ...
  g_ref = jax.tree_util.tree_map(lambda a, b: eta_hat * (a + eta * b), jax.grad(l_mix)(params),
                                 jax.grad(r)(params))
  chex.assert_trees_all_close(grads, g_ref, rtol=1e-4, atol=1e-6)
  g_mix = jax.tree_util.tree_map(lambda a: eta_hat * a, jax.grad(l_mix)(params))
  diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(grads),
                                                          jax.tree_util.tree_leaves(g_mix)))
  assert diff > 1e-2  # ... but the gradient has R's part (a differentiable eta_hat cancels it).


class Net(nn.Module):
  """Batch norm and dropout: the batch-norm policy and the dropout masks matter."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(16, name="hidden")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    x = nn.Dropout(0.3, deterministic=not train)(nn.relu(x))
    return nn.Dense(3, name="head")(x)


class NnxNet(nnx.Module):
  """`Net` in NNX: MixupE's concatenated pass routes nnx.BatchNorm and nnx.Dropout too."""

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(5, 16, rngs=rngs)
    self.bn = nnx.BatchNorm(16, rngs=rngs)
    self.drop = nnx.Dropout(0.3, rngs=rngs)
    self.head = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.drop(nnx.relu(self.bn(self.hidden(x)))))


def _net_setup(b=16, framework="linen"):
  x, y = _zero_mean_batch(b, shift=0.5)
  if framework == "nnx":
    apply, v = adapters.make_nnx_apply(NnxNet(nnx.Rngs(0)), train=True)
    return apply, v, x, y
  v = Net().init(jax.random.key(0), x)
  return adapters.make_apply(Net(), train=True), v, x, y


def _bn_mean(state):
  if "batch_stats" in state:
    return state["batch_stats"]["bn"]["mean"]
  return jax.tree_util.tree_leaves(state["nnx_state"]["bn"]["mean"])[0]


def _run(obj, apply, v, x, y, key=jax.random.key(2)):
  f = jax.value_and_grad(lambda p: obj(apply, {**v, "params": p}, x, y, key), has_aux=True)
  (loss, (state, metrics)), grads = f(v["params"])
  return loss, state, metrics, grads


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_clean_pass_concat_and_separate_with_batch_norm_and_dropout(framework):
  apply, v, x, y = _net_setup(framework=framework)
  base = objectives.mixup(policies.mixup(1.0), num_classes=3)
  ref_loss, ref_state, _, _ = _run(base, apply, v, x, y)
  concat = _run(mixupe.mixupe(base), apply, v, x, y)
  grouped = _run(mixupe.mixupe(base, groups=4), apply, v, x, y)  # Rows interleaved by group.
  separate = _run(mixupe.mixupe(base, clean_pass="separate"), apply, v, x, y)
  everything = _run(mixupe.mixupe(base, batch_stats="all"), apply, v, x, y)
  # 'mixed': the mixed rows of the concatenated pass see what a mixup pass sees
  # (batch statistics of the mixed rows, the same dropout masks), and only they
  # update the running statistics.
  for got in (concat, grouped, separate):
    np.testing.assert_allclose(got[2]["loss_mix"], ref_loss, rtol=1e-5)
    chex.assert_trees_all_close(got[1], ref_state, rtol=1e-5, atol=1e-6)
  # 'all': statistics over mixed and clean rows change both.
  assert abs(float(everything[2]["loss_mix"]) - float(ref_loss)) > 1e-4
  assert not np.allclose(_bn_mean(everything[1]), _bn_mean(ref_state))
  # Separate: the clean pass in training mode on its own (own statistics, same dropout key).
  _, k_drop = jax.random.split(jax.random.key(2))
  f, _ = apply(v, x, key=k_drop)
  q = jnp.sum((jax.nn.one_hot(y, 3) - jax.nn.softmax(f)) * f, -1)
  np.testing.assert_allclose(separate[2]["mixupe_q_abs"], jnp.abs(q).mean(), rtol=1e-5)
  for got in (concat, separate, everything):
    assert all(np.isfinite(a).all() for a in jax.tree_util.tree_leaves(got[3]))


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_concat_clean_outputs_are_per_example(framework):
  """With statistics from the mixed rows, perturbing one clean row leaves the others alone."""
  apply, v, x, y = _net_setup(8, framework)
  base = objectives.mixup(policies.mixup(1.0), num_classes=3)
  layout = adapters.RowLayout.of(8, 8, 1)
  draw = base.draw(jax.random.key(0), x, y)

  def clean_outputs(xc):
    with adapters.mixed_rows_only(layout, "mixed", jax.random.key(1)):
      out, _ = apply(v, adapters.interleave(x, xc, 1), key=jax.random.key(2),
                     mix=layout.spec(base.mix_spec(draw)))
    return layout.split(out)

  mixed_a, clean_a = clean_outputs(x)
  mixed_b, clean_b = clean_outputs(x.at[3].add(2.0))
  np.testing.assert_allclose(mixed_a, mixed_b, rtol=1e-6)
  np.testing.assert_allclose(np.delete(np.asarray(clean_a), 3, 0),
                             np.delete(np.asarray(clean_b), 3, 0), rtol=1e-6)
  assert not np.allclose(clean_a[3], clean_b[3])


def test_rho_subset_and_running_mean():
  fn, params = _relu_net(bias=True)
  x, y = _zero_mean_batch(16, shift=0.5)
  apply = adapters.make_apply_fn(fn)
  base = objectives.mixup(policies.mixup(1.0), num_classes=3)
  key = jax.random.key(9)
  _, (_, m) = mixupe.mixupe(base, rho=0.25, groups=2)(apply, {"params": params}, x, y, key)
  idx = mixupe.clean_subset(jax.random.fold_in(key, mixupe.SUBSET_SALT), 16, 2, 0.25)
  assert idx.shape == (4,) and len(set(np.asarray(idx).tolist())) == 4
  assert set(np.asarray(idx[:2]).tolist()) <= set(range(8))  # Inside each group.
  assert set(np.asarray(idx[2:]).tolist()) <= set(range(8, 16))
  f = fn(params, x[idx])
  q = jnp.sum((jax.nn.one_hot(y[idx], 3) - jax.nn.softmax(f)) * f, -1)
  np.testing.assert_allclose(m["mixupe_q_abs"], jnp.abs(q).mean(), rtol=1e-5)
  # The estimate is unbiased: averaged over subsets it approaches the full-batch value.
  full = mixupe.mixupe(base)(apply, {"params": params}, x, y, key)[1][1]["mixupe_q_abs"]
  est = jax.jit(jax.vmap(lambda k: mixupe.mixupe(base, rho=0.25)(
      apply, {"params": params}, x, y, k)[1][1]["mixupe_q_abs"]))(
          jax.random.split(jax.random.key(1), 400))
  np.testing.assert_allclose(est.mean(), full, rtol=0.05)

  # Running mean of the inputs (E[x']) carried in the model state.
  obj = mixupe.mixupe(base, exact=True)
  with pytest.raises(ValueError, match="objective.init"):
    obj(apply, {"params": params}, x, y, key)
  v = {"params": params, **obj.init(x)}
  _, (s1, _) = obj(apply, v, x[:8], y[:8], key)
  _, (s2, m2) = obj(apply, {"params": params, **s1}, x[8:], y[8:], key)
  np.testing.assert_allclose(s2["mixupe"]["mean"], x.mean(0), atol=1e-6)
  assert float(s2["mixupe"]["count"]) == 16
  _, (_, m_ref) = mixupe.mixupe(base, exact=True, mean=x.mean(0))(
      apply, {"params": params}, x[8:], y[8:], key)
  np.testing.assert_allclose(m2["mixupe_q_abs"], m_ref["mixupe_q_abs"], rtol=1e-5)


def test_arguments_and_composition():
  base = objectives.mixup(policies.mixup(1.0), num_classes=3)
  bad = [dict(clean_pass="both"), dict(batch_stats="clean"), dict(rho=0.0), dict(rho=1.5),
         dict(eta=-1.0), dict(mean="dataset"), dict(clean_pass="separate", batch_stats="all"),
         dict(alpha=0.0), dict(groups=0), dict(weight=1.5)]
  for kw in bad:
    with pytest.raises(ValueError):
      mixupe.mixupe(base, **kw)
  with pytest.raises(ValueError, match="pass alpha"):
    mixupe.mixupe(objectives.erm(num_classes=3))
  with pytest.raises(ValueError, match="disagrees with the base policy"):
    mixupe.mixupe(base, alpha=0.5)
  obj = methods.get_objective("untied+amp+mixupe", num_classes=3, alpha=0.5, beta=2.0,
                                 mixupe={"eta": 0.01, "rho": 0.5})
  assert isinstance(obj, mixupe.MixupE) and isinstance(obj.base, amp.Amp)
  assert obj.eta == 0.01 and obj.rho == 0.5 and obj.weight == pytest.approx(2.0 / 2.5)
  with pytest.raises(ValueError, match="identically zero"):
    methods.get_objective("untied+mixupe", num_classes=3, loss="cosine", cosine_dim=4)
  cos = methods.get_objective("untied+mixupe", num_classes=3, loss="cosine", cosine_dim=4,
                              mixupe={"exact": True, "mean": "batch"})
  assert cos.to_logits(jnp.ones((2, 4))).shape == (2, 3)


class Split(nn.Module):
  """Encoder (dense, batch norm) and head (dense); mixing at the encoder's output."""

  def setup(self):
    self.inp = nn.Dense(8)
    self.bn = nn.BatchNorm()
    self.enc = nn.Dense(8)
    self.out = nn.Dense(3)

  def encode(self, x, train: bool = False):
    x = nn.relu(self.bn(self.inp(x.reshape(x.shape[0], -1)), use_running_average=not train))
    return self.enc(x)

  def head(self, h, train: bool = False):
    return self.out(nn.relu(h))

  def __call__(self, x, train: bool = False):
    return self.head(self.encode(x, train), train)


def test_amp_and_mixupe_together_and_split_model():
  apply, v, x, y = _net_setup()
  base = objectives.mixup(policies.mixup(1.0), num_classes=3)
  a = amp.amp(base, eps=0.05)
  amp_loss, amp_state, amp_m, _ = _run(a, apply, v, x, y)
  both = _run(mixupe.mixupe(a), apply, v, x, y)
  # MixupE's concatenated final pass reproduces AMP's final pass on the mixed rows.
  np.testing.assert_allclose(both[2]["loss_mix"], amp_loss, rtol=1e-5)
  chex.assert_trees_all_close(both[1], amp_state, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(both[2]["amp_mask_frac"], amp_m["amp_mask_frac"])
  assert float(both[2]["mixupe_r"]) > 0

  # AMP's encoder runs once (a split model, or the unmodified model at the same point): the
  # concatenated pass starts at the point, with the numbers of whole-model passes.
  xi = jnp.asarray(np.random.default_rng(0).normal(size=(8, 5, 5, 2)), jnp.float32)
  yi = y[:8]
  vs = Split().init(jax.random.key(0), xi)
  hb = objectives.mixup(policies.mixup(1.0), num_classes=3, point="enc")
  split, linen = adapters.make_split_apply(Split(), point="enc"), adapters.make_apply(Split())
  obj = mixupe.mixupe(amp.amp(hb, eps=0.05), rho=0.5)
  lib.assert_concat_pass_starts_at_point(obj, split, vs, xi, yi, matmuls_above=1)
  lib.assert_concat_pass_starts_at_point(obj, linen, vs, xi, yi, matmuls_above=1)
  # With batch_stats='all' the clean rows join the encoder's statistics: whole-model rows.
  obj = mixupe.mixupe(amp.amp(hb, eps=0.05), rho=0.5, batch_stats="all")
  got, ref = _run(obj, split, vs, xi, yi), _run(obj, lib.whole_model_passes(split), vs, xi, yi)
  chex.assert_trees_all_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, point", [("amp", None), ("amp+mixupe", None),
                                           ("amp+mixupe", "bn")])  # 'bn': started at the point.
def test_sharded_train_step_equals_single_device(method, point):
  mesh = Mesh(np.array(jax.devices()), ("data",))
  assert mesh.shape["data"] == 8
  apply, v, x, y = _net_setup(32)
  kw = dict(num_classes=3, amp={"eps": 0.05}, mixupe={"eta": 0.1, "rho": 0.5}, point=point)
  sharded = methods.get_objective(method, mesh=mesh, **kw)
  single = methods.get_objective(method, pairing="random", **kw)
  group = pairing.grouped(pairing.random_permutation, 8)

  def with_pairing(obj):  # The innermost objective's pairing, through any wrappers.
    if isinstance(obj, objectives.Wrapper):
      return dataclasses.replace(obj, base=with_pairing(obj.base))
    return dataclasses.replace(obj, pairing=group)

  single = with_pairing(single)
  if isinstance(single, mixupe.MixupE):
    single = dataclasses.replace(single, groups=8)
  tx = optax.sgd(0.1)
  state = train_step.create_train_state(v, tx, jax.random.key(0), ema=False)

  def step(obj):
    return jax.jit(lambda s, b: train_step.train_step(s, b, objective=obj, apply=apply, tx=tx))

  batch = {"inputs": x, "labels": y}
  sharded_batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
  s_sh, m_sh = step(sharded)(state, sharded_batch)
  s_1, m_1 = step(single)(state, batch)
  assert len(sharded_batch["inputs"].sharding.device_set) == 8
  np.testing.assert_allclose(m_sh["loss"], m_1["loss"], rtol=1e-5)
  chex.assert_trees_all_close(s_sh.params, s_1.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(s_sh.model_state, s_1.model_state, rtol=1e-5, atol=1e-6)
  for k in m_1:
    np.testing.assert_allclose(m_sh[k], m_1[k], rtol=1e-4, atol=1e-6, err_msg=k)
  if isinstance(sharded, mixupe.MixupE):
    with pytest.raises(ValueError, match="groups"):
      dataclasses.replace(sharded, groups=4)(apply, v, sharded_batch["inputs"],
                                             sharded_batch["labels"], jax.random.key(0))


class _ConcatJvp(mixupe.MixupE):
  """Exact MixupE with the former formulation: one JVP over all [mixed; clean] rows."""

  def _clean_jvp_pass(self, apply, variables, inputs, clean, tangent, prepared, groups):
    return self._concat_pass(apply, variables, inputs, clean, None, tangent, prepared, groups)


class DeepNet(nn.Module):
  """Two batch norms and two dropouts, mixing point in the middle ('mid')."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(16)(x)))
    x = nn.Dropout(0.2, deterministic=not train)(x)
    x = nn.Dense(16, name="mid")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    x = nn.Dropout(0.2, deterministic=not train)(x)
    return nn.Dense(3)(x)


@pytest.mark.parametrize("framework,point,rho,groups", [("linen", "mid", 0.5, 2),
                                                        ("nnx", None, 1.0, None)])
def test_exact_clean_jvp_pass_equals_concatenated_jvp(framework, point, rho, groups):
  """The JVP over the clean rows alone: the loss, state and gradient of the one over all rows."""
  if framework == "nnx":
    apply, v, x, y = _net_setup(framework="nnx")
  else:
    x, y = _zero_mean_batch(16, shift=0.5)
    v = DeepNet().init(jax.random.key(0), x)
    apply = adapters.make_apply(DeepNet(), train=True)
  base = objectives.mixup(policies.mixup(1.0), num_classes=3, point=point)
  new = mixupe.mixupe(base, exact=True, mean="batch", rho=rho, groups=groups, eta=0.5)
  old = _ConcatJvp(**{f.name: getattr(new, f.name) for f in dataclasses.fields(new)})
  def compiled(obj):
    f = jax.value_and_grad(lambda p: obj(apply, {**v, "params": p}, x, y, jax.random.key(2)),
                           has_aux=True)
    return jax.jit(f).lower(v["params"]).compile()

  fast, slow = compiled(new), compiled(old)
  (loss, (state, metrics)), grads = fast(v["params"])
  (loss_ref, (state_ref, metrics_ref)), grads_ref = slow(v["params"])
  for k in ("loss", "loss_mix", "mixupe_r", "mixupe_q_abs"):
    np.testing.assert_allclose(metrics[k], metrics_ref[k], rtol=1e-5, err_msg=k)
  chex.assert_trees_all_close(state, state_ref, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(grads, grads_ref, rtol=1e-4, atol=1e-6)
  assert float(metrics["mixupe_r"]) > 0.01
  # The program no longer carries tangents through the mixed rows.
  assert fast.cost_analysis()["flops"] < slow.cost_analysis()["flops"]
