"""The model zoo: parameter counts, shapes, mixing points, global batch norm, input errors.

Big models are only traced (`jax.eval_shape`); numbers come from tiny
configurations of each family, with parameters drawn by NumPy (compiling
`init` costs more than the tests themselves on a CPU).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mixjax import hidden, mixing, models
from mixjax.models import coatnet, layers, resnet, text

# ----------------------------------------------------------------------------- helpers


def shapes_of(model, x, **kwargs):
  """(output, variables) as ShapeDtypeStructs, without running anything."""
  keys = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  return jax.eval_shape(lambda x: model.init_with_output(keys, x, **kwargs), x)


def num_params(variables) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(variables["params"]))


def random_variables(model, x, seed=0):
  """Variables of `model` for input `x` filled by NumPy (fan-in scaled normals; BN stats 0/1)."""
  _, shapes = shapes_of(model, x)
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "mean":
      return jnp.zeros(s.shape, s.dtype)
    if name == "var":
      return jnp.ones(s.shape, s.dtype)
    if name == "scale":
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(s.shape), s.dtype)
    if name in ("bias", "cls", "pos_embedding", "relative_bias", "embedding") or len(s.shape) < 2:
      return jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype)
    fan_in = int(np.prod(s.shape[:-1]))
    return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(fan_in), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


# A tiny configuration of every family: (registry name, overrides, one example's shape, dtype).
TINY = {
    "resnet_basic": ("resnet18", dict(num_classes=5, width=4, stage_sizes=(1, 1, 1, 1)),
                     (16, 16, 3), jnp.float32),
    "resnet_bottleneck": ("resnet50", dict(num_classes=5, width=4, stage_sizes=(1, 1, 1, 1)),
                          (16, 16, 3), jnp.float32),
    "preact_basic": ("preact_resnet18", dict(width=4, stage_sizes=(1, 1, 1, 1)), (8, 8, 3),
                     jnp.float32),
    "preact_bottleneck": ("preact_resnet50", dict(width=4, stage_sizes=(1, 1, 1, 1)), (8, 8, 3),
                          jnp.float32),
    "wrn": ("wrn16_8", dict(depth=10, widen_factor=1, dropout_rate=0.3), (8, 8, 3), jnp.float32),
    "vit": ("vit_ti16", dict(patch_size=4, hidden_size=16, depth=2, num_heads=2, mlp_dim=32,
                             head_zeroinit=False), (8, 8, 3), jnp.float32),
    "coatnet": ("coatnet0", dict(num_blocks=(1, 1, 1, 1, 1), channels=(8, 8, 8, 32, 32)),
                (32, 32, 3), jnp.float32),
    "mlp": ("mlp", dict(num_classes=3), (5,), jnp.float32),
    "lenet": ("lenet", dict(num_classes=4), (16, 20, 1), jnp.float32),
    "vgg": ("vgg11", dict(num_classes=4, width=8, hidden_size=8), (32, 32, 1), jnp.float32),
    "kim_cnn": ("kim_cnn", dict(vocab_size=30, word_dim=8, num_filters=4), (9,), jnp.int32),
    "bilstm": ("bilstm_attention", dict(vocab_size=30, word_dim=8, hidden_size=4), (9,),
               jnp.int32),
    "gan_generator": ("gan_generator", dict(hidden_sizes=(8, 8, 8)), (2,), jnp.float32),
    "gan_discriminator": ("gan_discriminator", dict(hidden_sizes=(8, 8, 8)), (2,), jnp.float32),
    "digits_cnn": ("digits_cnn", {}, (8, 8, 1), jnp.float32),
    "preact_small": ("preact_resnet_small", dict(width=4), (8, 8, 1), jnp.float32),
    "preact_small_dense": ("preact_resnet_small", dict(width=4, conv=False), (8, 8, 1),
                           jnp.float32),
    "mlp_dropout": ("mlp", dict(num_classes=3, hidden_sizes=(6, 5), dropout=0.5), (5,),
                    jnp.float32),
}


def tiny(family, batch=4, seed=0):
  name, kw, shape, dtype = TINY[family]
  model = models.get_model(name, **kw)
  rng = np.random.default_rng(seed + 1)
  if dtype == jnp.int32:
    x = rng.integers(2, 30, (batch,) + shape)
    x[:, -3:] = 0  # Some padding.
    x[0, 5:] = 0
    x = jnp.asarray(x, jnp.int32)
  else:
    x = jnp.asarray(rng.standard_normal((batch,) + shape), jnp.float32)
  return model, random_variables(model, x, seed), x


# ----------------------------------------------------------------------------- registry

ISSUE_NAMES = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "preact_resnet18",
               "preact_resnet34", "preact_resnet50", "preact_resnet101", "wrn28_10", "wrn16_8",
               "vit_ti16", "vit_s16", "vit_b16", "vit_b32", "vit_l16", "coatnet0", "coatnet1",
               "coatnet2", "mlp", "lenet", "vgg11", "vgg13", "kim_cnn", "bilstm_attention",
               "gan_generator", "gan_discriminator", "digits_cnn"]


def test_registry_names():
  assert set(ISSUE_NAMES) <= set(models.list_models())
  assert models.list_models() == sorted(models.list_models())


def test_unknown_name_and_bad_arguments_raise():
  with pytest.raises(ValueError, match=r"Unknown model name 'resnet51'.*resnet50"):
    models.get_model("resnet51")
  with pytest.raises(ValueError, match="head must be one of"):
    models.get_model("resnet18", head="softmax")
  with pytest.raises(ValueError, match="dtype"):
    models.get_model("vit_b16", dtype=jnp.int32)
  with pytest.raises(ValueError, match="attention_impl"):
    models.get_model("vit_b16", attention_impl="flash")
  with pytest.raises(ValueError, match="num_classes"):
    models.get_model("mlp", num_classes=0)
  with pytest.raises(ValueError, match="depth must be 6n"):
    models.get_model("wrn28_10", depth=27)
  with pytest.raises(ValueError, match="block_types"):
    models.get_model("coatnet0", block_types="CCTX")
  with pytest.raises(TypeError):  # A keyword the model does not take (train.py reports it).
    models.get_model("mlp", widht=3)


# ----------------------------------------------------------------------------- parameter counts

PUBLISHED = {  # name -> (published count, input shape, classes)
    "resnet50": (25.56e6, (224, 224, 3), 1000),
    "resnet101": (44.55e6, (224, 224, 3), 1000),
    "vit_b16": (86.57e6, (224, 224, 3), 1000),
    "preact_resnet18": (11.17e6, (32, 32, 3), 10),
    "wrn28_10": (36.48e6, (32, 32, 3), 10),
    "coatnet0": (25e6, (224, 224, 3), 1000),
}

EXACT = {  # torchvision / timm counts of the same layouts (default classes and input size).
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
    "resnet101": 44_549_160, "resnet152": 60_192_808, "vit_ti16": 5_717_416,
    "vit_s16": 22_050_664, "vit_b16": 86_567_656, "vit_b32": 88_224_232, "vit_l16": 304_326_632,
    "wrn28_10": 36_479_194, "coatnet0": 25_036_820,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_published(name):
  count, shape, classes = PUBLISHED[name]
  model = models.get_model(name, num_classes=classes)
  n = num_params(shapes_of(model, jax.ShapeDtypeStruct((1,) + shape, jnp.float32))[1])
  assert abs(n - count) / count < 0.005, (name, n, count)


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", ISSUE_NAMES)
def test_forward_shape_at_paper_input_size(name):
  spec = models.model_spec(name)
  model = models.get_model(name)
  x = jax.ShapeDtypeStruct((2,) + spec.input_shape, spec.input_dtype)
  out, variables = shapes_of(model, x)
  classes = 2 if name == "gan_generator" else getattr(model, "num_classes")
  assert out.shape == (2, classes) and out.dtype == jnp.float32
  if name in EXACT:
    assert num_params(variables) == EXACT[name]
  bn_families = ("resnet", "preact", "wrn", "coatnet", "vgg", "digits")
  assert ("batch_stats" in variables) == name.startswith(bn_families)


@pytest.mark.parametrize("name", ["resnet50", "vit_b16", "coatnet0", "vgg11", "bilstm_attention"])
def test_bfloat16_compute_float32_params(name):
  spec = models.model_spec(name)
  model = models.get_model(name, dtype=jnp.bfloat16)
  out, variables = shapes_of(model, jax.ShapeDtypeStruct((2,) + spec.input_shape,
                                                         spec.input_dtype))
  assert out.dtype == jnp.bfloat16
  assert {a.dtype for a in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}


def test_bfloat16_forward_close_to_float32():
  model, v, x = tiny("resnet_basic")
  name, kw, _, _ = TINY["resnet_basic"]
  bf16 = models.get_model(name, dtype=jnp.bfloat16, **kw)
  out32, out16 = jax.jit(lambda v, x: (model.apply(v, x), bf16.apply(v, x)))(v, x)
  assert out16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out16, np.float32), out32, atol=0.1, rtol=0.05)


def test_cosine_head_gives_unit_vectors():
  name, kw, shape, _ = TINY["preact_basic"]
  model = models.get_model(name, head="cosine", embed_dim=7, **kw)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3,) + shape), jnp.float32)
  out = model.apply(random_variables(model, x), x)
  assert out.shape == (3, 7)
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, rtol=1e-5)
  # Default dimension: num_classes (train.py passes cosine_dim as num_classes).
  out, _ = shapes_of(models.get_model("mlp", num_classes=300, head="cosine"),
                     jax.ShapeDtypeStruct((2, 4), jnp.float32))
  assert out.shape == (2, 300)


# ----------------------------------------------------------------------------- input errors


@pytest.mark.parametrize("name, shape, dtype, match", [
    ("vit_b16", (2, 200, 200, 3), jnp.float32, "divisible by 16"),
    ("coatnet0", (2, 100, 100, 3), jnp.float32, "divisible by 32"),
    ("resnet50", (2, 224, 224), jnp.float32, r"\(batch, height, width, channels\)"),
    ("preact_resnet18", (2, 32, 32, 3), jnp.int32, "floating-point"),
    ("vgg11", (2, 16, 16, 1), jnp.float32, "at least 32x32"),
    ("kim_cnn", (2, 4), jnp.int32, "at least 5 tokens"),
    ("kim_cnn", (2, 40), jnp.float32, "integer token ids"),
    ("bilstm_attention", (2, 4, 3), jnp.int32, r"\(batch, length\)"),
    ("mlp", (5,), jnp.float32, "batch of shape"),
    ("gan_discriminator", (2, 3), jnp.float32, "2 features"),
])
def test_bad_input_shapes_raise(name, shape, dtype, match):
  with pytest.raises(ValueError, match=match):
    shapes_of(models.get_model(name), jax.ShapeDtypeStruct(shape, dtype))


@pytest.mark.parametrize("family, other", [("vit", (16, 16, 3)), ("coatnet", (64, 64, 3)),
                                           ("lenet", (20, 20, 1)), ("mlp", (6,))])
def test_input_size_other_than_at_init_raises(family, other):
  model, v, _ = tiny(family)
  with pytest.raises(ValueError, match="initialised with"):
    jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2,) + other)), v)


# ----------------------------------------------------------------------------- mixing points


@pytest.mark.parametrize("family", sorted(TINY))
def test_every_mixing_point_mixes_that_output(family):
  """lam = 0 at any point hands each example its partner's activations from there on.

  Eval mode has no cross-example interaction, so the output must be out[perm];
  a fractional lam must change the output. (One jit for all points: cheaper
  than op-by-op execution on a CPU.)
  """
  model, v, x = tiny(family)
  perm = jnp.array([2, 3, 1, 0])
  # Every listed point is a submodule, called in the listed order.
  paths = hidden.module_paths(model, v, x)
  assert [p for p in paths if p in model.mixing_points] == list(model.mixing_points)

  @jax.jit
  def run(v, x):
    outs = [model.apply(v, x)]
    for point in model.mixing_points:
      with hidden.mix_at(point, jnp.zeros(4), perm):
        outs.append(model.apply(v, x))
    with hidden.mix_at(model.mixing_points[-1], jnp.full(4, 0.5), perm):
      outs.append(model.apply(v, x))
    return outs

  out, *swapped, half = run(v, x)
  assert np.all(np.isfinite(out))
  for point, o in zip(model.mixing_points, swapped):
    np.testing.assert_allclose(o, out[perm], rtol=1e-5, atol=1e-5, err_msg=point)
  assert not np.allclose(half, out, atol=1e-6)


def test_mix_at_equals_by_hand_mlp():
  """MLP mixed after its first hidden layer, against a NumPy forward pass."""
  model, v, x = tiny("mlp")
  lam = jnp.array([0.1, 0.4, 0.7, 1.0])
  perm = jnp.array([1, 0, 3, 2])
  with hidden.mix_at("stage1", lam, perm):
    out = model.apply(v, x)
  p = jax.tree_util.tree_map(np.asarray, v["params"])
  h = np.maximum(np.asarray(x) @ p["stage1"]["dense"]["kernel"] + p["stage1"]["dense"]["bias"], 0)
  lam_np = np.asarray(lam)[:, None]
  h = lam_np * h + (1 - lam_np) * h[np.asarray(perm)]
  h = np.maximum(h @ p["stage2"]["dense"]["kernel"] + p["stage2"]["dense"]["bias"], 0)
  np.testing.assert_allclose(out, h @ p["head"]["kernel"] + p["head"]["bias"], rtol=1e-5,
                             atol=1e-5)


def test_mix_at_equals_split_resnet_in_training_mode():
  """ResNet mixed after stage 2 (train mode: BN statistics of the mixed batch) = split model."""
  name, kw, _, _ = TINY["resnet_basic"]
  model, v, x = tiny("resnet_basic")
  lam = jnp.array([0.2, 0.5, 0.9, 0.3])
  perm = jnp.array([3, 2, 0, 1])
  with hidden.mix_at("stage2", lam, perm):
    out, state = model.apply(v, x, train=True, mutable=["batch_stats"])

  # Bottom: the model up to stage 2; mix by hand; top: stages 3 and 4, pool, head.
  _, inter = model.apply(v, x, train=True, mutable=["batch_stats", "intermediates"],
                         capture_intermediates=lambda m, _: m.name == "stage2")
  h = inter["intermediates"]["stage2"]["__call__"][0]
  h = mixing.mix_with_partner(h, perm, lam)
  norm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)
  for i, stage in ((2, "stage3"), (3, "stage4")):
    s = resnet.Stage(resnet.BasicBlock, 1, 4 * 2**i, 2, norm)
    h, st = s.apply({"params": v["params"][stage], "batch_stats": v["batch_stats"][stage]}, h,
                    train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(
        st["batch_stats"]["block1"]["bn1"]["mean"],
        state["batch_stats"][stage]["block1"]["bn1"]["mean"], rtol=1e-5, atol=1e-6)
  h = jnp.mean(h, axis=(1, 2))
  ref = h @ v["params"]["head"]["kernel"] + v["params"]["head"]["bias"]
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_text_embed_point_mixes_embeddings_and_padding_mask():
  """Word-level mixing: the mixed sentence is valid where either sentence is."""
  model, v, x = tiny("bilstm")
  _, state = model.apply(v, x, capture_intermediates=lambda m, _: m.name == "embed",
                         mutable=["intermediates"])
  emb, valid = state["intermediates"]["embed"]["__call__"][0]
  assert emb.shape == (4, 9, 8) and valid.shape == (4, 9)
  np.testing.assert_array_equal(valid, np.asarray(x) != 0)
  # Extra trailing padding does not change the output (the LSTM and attention skip it);
  # out-of-vocabulary ids read as unknown (id 1), never NaN.
  x_long = jnp.concatenate([x, jnp.zeros((4, 3), jnp.int32)], axis=1)
  run = jax.jit(model.apply)
  np.testing.assert_allclose(run(v, x_long), run(v, x), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(run(v, x.at[:, 0].set(1000)), run(v, x.at[:, 0].set(1)), rtol=1e-6)


# ----------------------------------------------------------------------------- text embeddings


def test_embeddings_from_array_or_npy_and_frozen(tmp_path):
  table = np.random.default_rng(0).standard_normal((40, 6)).astype(np.float32)
  path = str(tmp_path / "emb.npy")
  np.save(path, table)
  tokens = jnp.asarray([[5, 6, 7, 8, 9, 0], [1, 2, 3, 4, 5, 6]], jnp.int32)
  for name in ("kim_cnn", "bilstm_attention"):
    model = models.get_model(name, embeddings=path, trainable_embeddings=False)
    assert (model.embeddings.shape, text._sizes(model)) == ((40, 6), (40, 6))
    with pytest.raises(ValueError, match="embeddings have shape"):
      models.get_model(name, embeddings=table, vocab_size=10)
  # The 'embed' submodule both models build (see text._embed): initial values and freezing.
  for trainable in (True, False):
    embed = text.TokenEmbed(40, 6, text.Embeddings(table), trainable)
    v = embed.init(jax.random.key(0), tokens)
    np.testing.assert_array_equal(v["params"]["embedding"], table)
    emb, valid = embed.apply(v, tokens)
    np.testing.assert_array_equal(emb, table[np.asarray(tokens)])
    np.testing.assert_array_equal(valid, np.asarray(tokens) != 0)
    g = jax.grad(lambda p: embed.apply({"params": p}, tokens)[0].sum())(v["params"])
    assert (float(jnp.abs(g["embedding"]).max()) > 0) == trainable


# ----------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("family", ["lenet", "mlp_dropout"])
def test_dropout_uses_the_dropout_rng(family):
  model, v, x = tiny(family)
  run = lambda k: model.apply(v, x, train=True, rngs={"dropout": jax.random.key(k)})  # noqa: E731
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.allclose(run(0), run(1))
  np.testing.assert_array_equal(model.apply(v, x), model.apply(v, x))  # Eval: no dropout.


def test_mlp_dropout_drops_hidden_units_and_keeps_the_parameters():
  """dropout=0 (the default) is the plain MLP; p > 0 zeroes about p of the hidden units."""
  model, v, x = tiny("mlp_dropout")
  plain = models.get_model("mlp", num_classes=3, hidden_sizes=(6, 5))
  np.testing.assert_array_equal(plain.apply(v, x, train=True), model.apply(v, x))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((500, 5)), jnp.float32)
  wide = models.get_model("mlp", num_classes=3, hidden_sizes=(64,), dropout=0.25)
  variables = random_variables(wide, x)
  _, inter = wide.apply(variables, x, train=True, rngs={"dropout": jax.random.key(0)},
                        capture_intermediates=True)
  kept = np.asarray(inter["intermediates"]["Dropout_0"]["__call__"][0])
  active = np.asarray(inter["intermediates"]["stage1"]["__call__"][0]) > 0
  assert abs(np.mean(kept[active] == 0) - 0.25) < 0.02
  np.testing.assert_allclose(kept[kept != 0], np.asarray(
      inter["intermediates"]["stage1"]["__call__"][0])[kept != 0] / 0.75, rtol=1e-6)
  with pytest.raises(ValueError, match="dropout must be in"):
    models.get_model("mlp", dropout=1.0)


# ----------------------------------------------------------------------------- batch norm


def test_batch_norm_is_global_over_a_sharded_batch():
  """Under jit with the batch sharded over 8 devices: the same statistics as unsharded.

  Inside shard_map the per-shard statistics differ unless `axis_name` is set.
  """
  devices = jax.devices()
  assert len(devices) == 8
  mesh = Mesh(np.asarray(devices), ("data",))
  name, kw, shape, _ = TINY["resnet_basic"]
  model = models.get_model(name, **kw)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((16,) + shape) * 2 + 1, jnp.float32)
  v = random_variables(model, x)
  step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  out_ref, st_ref = step(v, x)
  out_sh, st_sh = step(v, jax.device_put(x, NamedSharding(mesh, P("data"))))
  assert len(out_sh.sharding.device_set) == 8
  chex_close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
  jax.tree_util.tree_map(chex_close, st_sh, st_ref)
  np.testing.assert_allclose(out_sh, out_ref, rtol=1e-4, atol=1e-4)

  def sharded(axis_name):
    m = models.get_model(name, axis_name=axis_name, **kw)

    def body(v, x):
      out, st = m.apply(v, x, train=True, mutable=["batch_stats"])
      return out, jax.lax.pmean(st, "data")
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("data")),
                                 out_specs=(P("data"), P()), check_vma=False))(v, x)

  out_ax, st_ax = sharded("data")
  jax.tree_util.tree_map(chex_close, st_ax, st_ref)
  np.testing.assert_allclose(out_ax, out_ref, rtol=1e-4, atol=1e-4)
  _, st_local = sharded(None)  # Control: per-device statistics are not the global ones.
  diffs = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), st_local, st_ref)
  assert max(jax.tree_util.tree_leaves(diffs)) > 1e-3


# ----------------------------------------------------------------------------- pieces


def test_relative_position_index_against_brute_force():
  h, w = 3, 4
  idx = coatnet.relative_position_index(h, w)
  pos = [(i, j) for i in range(h) for j in range(w)]
  offsets = {}
  for a, (i1, j1) in enumerate(pos):
    for b, (i2, j2) in enumerate(pos):
      offsets.setdefault((i1 - i2, j1 - j2), set()).add(int(idx[a, b]))
  assert all(len(s) == 1 for s in offsets.values())  # One table row per offset ...
  rows = sorted(next(iter(s)) for s in offsets.values())
  assert rows == list(range((2 * h - 1) * (2 * w - 1)))  # ... and a different one for each.


def test_vit_attention_implementation_xla_equals_default():
  name, kw, _, _ = TINY["vit"]
  model, v, x = tiny("vit")
  xla = models.get_model(name, attention_impl="xla", **kw)
  np.testing.assert_allclose(xla.apply(v, x), model.apply(v, x), rtol=1e-5, atol=1e-6)


def test_gan_generator_and_discriminator_shapes():
  g, vg, z = tiny("gan_generator")
  d, vd, _ = tiny("gan_discriminator")
  samples = g.apply(vg, z)
  assert samples.shape == (4, 2)
  assert d.apply(vd, samples).shape == (4, 1)


@pytest.mark.parametrize("name, last", [("gan_generator", "out"),
                                        ("gan_discriminator", "head")])
def test_gan_nets_pytorch_init(name, last):
  """pytorch_init: kernels and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)); default: zero biases."""
  x = jnp.zeros((1, 2))
  for pytorch_init in (False, True):
    net = models.get_model(name, hidden_sizes=(64, 64, 64), pytorch_init=pytorch_init)
    params = net.init(jax.random.key(0), x)["params"]
    layers_ = [params[f"stage{i}"]["dense"] for i in (1, 2, 3)] + [params[last]]
    for layer in layers_:
      bound = 1 / np.sqrt(layer["kernel"].shape[0])
      bias = np.abs(np.asarray(layer["bias"]))
      if pytorch_init:
        assert np.abs(layer["kernel"]).max() <= bound and 0 < bias.max() <= bound
        assert bias.size < 8 or bias.max() > 0.5 * bound    # spread over (-bound, bound)
      else:
        assert bias.max() == 0
  with pytest.raises(ValueError, match="fan_in"):
    models.mlp.pytorch_linear_init(0)


def test_small_preact_resnet_layout():
  """Stem, one-block stages and head; the dense variant has the same layers as Dense."""
  for conv, shape in ((True, (3, 3, 1, 8)), (False, (64, 8))):
    model = models.get_model("preact_resnet_small", width=8, num_blocks=3, conv=conv)
    assert model.mixing_points == ("input", "stem", "stage1", "stage2", "stage3", "pre_logits")
    _, v = shapes_of(model, jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32))
    p = v["params"]
    assert sorted(p) == ["head", "stage1", "stage2", "stage3", "stem"]
    assert p["stem"]["kernel"].shape == shape and "batch_stats" not in v
    block = p["stage1"]["conv1" if conv else "dense1"]["kernel"].shape
    assert block == ((3, 3, 8, 8) if conv else (8, 8))
  with pytest.raises(ValueError, match="num_blocks"):
    models.get_model("preact_resnet_small", num_blocks=0)


def test_point_is_identity():
  x = {"a": jnp.arange(3.0)}
  assert layers.Point().apply({}, x) is x


# ----------------------------------------------------------------------------- digits


def test_digits_cnn_reaches_95_percent_on_sklearn_digits():
  from sklearn import datasets, model_selection
  d = datasets.load_digits()
  x = d.images.astype(np.float32)[..., None] / 16.0
  y = d.target.astype(np.int32)
  xtr, xte, ytr, yte = model_selection.train_test_split(x, y, test_size=0.2, stratify=y,
                                                        random_state=0)
  mu, sd = xtr.mean(), xtr.std()
  xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
  model = models.get_model("digits_cnn")
  v = model.init(jax.random.key(0), jnp.asarray(xtr[:2]))
  steps = 150
  tx = optax.adamw(optax.cosine_decay_schedule(3e-3, steps), weight_decay=1e-4)
  params, stats = v["params"], v["batch_stats"]
  opt = tx.init(params)

  @jax.jit
  def step(params, stats, opt, xb, yb):
    def loss(p):
      out, st = model.apply({"params": p, "batch_stats": stats}, xb, train=True,
                            mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(out, yb).mean(), st["batch_stats"]
    (_, stats), g = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), stats, opt

  rng = np.random.default_rng(0)
  for _ in range(steps):
    i = rng.integers(0, len(xtr), 64)
    params, stats, opt = step(params, stats, opt, xtr[i], ytr[i])
  logits = model.apply({"params": params, "batch_stats": stats}, jnp.asarray(xte))
  assert float(np.mean(np.argmax(logits, -1) == yte)) >= 0.95


# ----------------------------------------------------------------------------- configs


def test_every_config_names_a_model_and_one_of_its_mixing_points():
  import glob
  import os

  from mixjax import config_utils
  root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
  specs = [p for p in sorted(glob.glob(os.path.join(root, "*.py")))
           if not os.path.basename(p).startswith("_")]
  specs += [os.path.join(root, "sst2_cnn.py") + ":point=sent",
            os.path.join(root, "sst2_lstm.py") + ":point=sent"]
  assert len(specs) > 10
  for spec in specs:
    c = config_utils.load_config(spec)
    model = models.get_model(c.model.name, num_classes=c.dataset.num_classes,
                              **dict(c.model.kwargs))
    if c.mix.point is not None:
      assert c.mix.point in model.mixing_points, (spec, c.mix.point)
    if c.model.name in ("resnet50", "vit_b16", "coatnet0", "digits_cnn", "preact_resnet18"):
      shape = tuple(c.dataset.input_shape)
      out, _ = shapes_of(model, jax.ShapeDtypeStruct((2,) + shape, jnp.float32))
      assert out.shape == (2, c.dataset.num_classes), spec
