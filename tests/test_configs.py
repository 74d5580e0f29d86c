"""Every config in configs/ loads, validates and builds; each backbone family trains 2 steps.

Recipes are shrunk by overrides (`model.kwargs` for width and depth, 16x16 or
32x32 images, 12-token sentences, batch 16, synthetic data). Per recipe, the
test compiles nothing: it builds the model with the recipe's kwargs, the data
iterator, schedule and optimizer, and traces (`jax.eval_shape`) the train
state's init, one train step with each of the recipe's methods (its mixing
point included) and the eval step. The compiles are shared: one 2-step run of
`train.train_and_evaluate` per backbone family (`FAMILY_RUNS`), and every
method once on the smallest model.
"""

from __future__ import annotations

import functools
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
import train_testlib as lib
from mixjax import adapters
from mixjax import config_utils
from mixjax import from_config
from mixjax import optim
from mixjax import train_step as ts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not os.path.basename(p).startswith("_"))
EXPECTED = {"imagenet_resnet50.py", "imagenet_vit_b16.py", "imagenet_coatnet0.py",
            "imagenet_resnet50_mixup.py", "cifar10_preactresnet18.py",
            "cifar100_preactresnet18.py", "cifar10_wrn28_10.py", "svhn_wrn16_8.py",
            "fashion_mnist_preactresnet18.py", "mnist_preactresnet18.py",
            "speech_commands_vgg11.py", "uci_mlp.py", "trec_cnn.py", "sst2_cnn.py",
            "sst2_lstm.py", "digits.py"}


# The recipes' own backbones, shrunk through `model.kwargs` (the same names and
# mixing points, a fraction of the width and depth).
TINY_KWARGS = {
    "resnet": dict(width=4, stage_sizes=(1, 1, 1, 1)),
    "preact_resnet": dict(width=4, stage_sizes=(1, 1, 1, 1)),
    "wrn": dict(depth=10, widen_factor=1),
    "vit": dict(patch_size=4, hidden_size=16, depth=2, num_heads=2, mlp_dim=32),
    "coatnet": dict(num_blocks=(1, 1, 1, 1, 1), channels=(8, 8, 8, 32, 32)),
    "vgg": dict(width=4, hidden_size=8),
    "kim_cnn": dict(word_dim=8, num_filters=4),
    "bilstm_attention": dict(word_dim=8, hidden_size=4),
    "mlp": dict(hidden_sizes=(16, 16)),
    "digits_cnn": {},
}
# Input sizes the shrunk models take (CoAtNet and VGG downsample 32x).
TINY_IMAGE = {"coatnet": 32, "vgg": 32}
# The recipe whose 2-step run compiles each family (mlp: `test_every_method_trains_...`).
FAMILY_RUNS = {
    "resnet": "imagenet_resnet50.py",  # bf16 compute, EMA, warm-up + cosine.
    "preact_resnet": "cifar10_preactresnet18.py",
    "wrn": "svhn_wrn16_8.py",
    "vit": "imagenet_vit_b16.py",
    "coatnet": "imagenet_coatnet0.py",
    "vgg": "speech_commands_vgg11.py",
    "kim_cnn": "trec_cnn.py",  # AMP mixing at the word embeddings of token-id inputs.
    "bilstm_attention": "sst2_lstm.py",
    "digits_cnn": "digits.py",
}
METHODS = ["erm", "mixup", "untied", "dat", "amp", "mixupe", "untied+amp+mixupe"]


def _family(name: str) -> str:
  return next(f for f in sorted(TINY_KWARGS, key=len, reverse=True) if name.startswith(f))


def _load(name: str, extra=()) -> config_utils.ConfigDict:
  """The recipe `configs/<name>` shrunk for CPU tests, validated."""
  c = config_utils.load_config(os.path.join(ROOT, "configs", name))
  shape = tuple(c.dataset.input_shape)
  family = _family(c.model.name)
  if c.dataset.input_dtype == "int32":
    small = (12,)
  elif len(shape) == 3:
    side = TINY_IMAGE.get(family, 16)
    small = (side, side, shape[-1])
  else:
    small = shape
  overrides = ["dataset.name=synthetic", f"dataset.input_shape={small}", "batch_size=16",
               "eval_batch_size=16", "total_steps=2", "dataset.train_examples=64",
               "dataset.eval_examples=16", "dataset.vocab_size=64", "progress_bar=False",
               "log_every_steps=1", "schedule.warmup_steps=0", "schedule.warmup_epochs=0.0",
               "mix.erm_warmup_steps=0", "study.seeds=1", "study.fgsm_eps=0.0",
               "study.corrupted_labels=0.0"]
  overrides += [f"model.kwargs.{k}={v}" for k, v in TINY_KWARGS[family].items()]
  c = config_utils.apply_overrides(c, overrides + list(extra))
  config_utils.validate(c)
  return c


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """The eval step and init, the same for several methods on one model, compile once."""
  with lib.compilation_cache(str(tmp_path_factory.mktemp("jax_cache"))) as path:
    yield path


def _check_results(config, results, methods) -> None:
  assert [r["method"] for r in results] == methods
  for r in results:
    assert r["step"] == 2
    assert np.isfinite(r["train"]["loss"]) and 0.0 <= r["eval"]["top1"] <= 1.0
    if config.ema_decay:
      assert "eval_ema" in r


def test_all_recipes_present_and_every_family_compiles():
  assert EXPECTED <= set(CONFIGS), EXPECTED - set(CONFIGS)
  families = {_family(_load(name).model.name) for name in CONFIGS}
  assert families == set(FAMILY_RUNS) | {"mlp"}
  assert all(_family(_load(name).model.name) == f for f, name in FAMILY_RUNS.items())


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_and_traces_on_synthetic_data(name):
  """The recipe's model, data, optimizer, schedule and methods, traced without compiling."""
  c = _load(name)
  mesh = from_config.mesh(c)
  module = from_config.model(c)
  data = from_config.data(c, mesh)
  try:
    batch = next(data.train)
  finally:
    data.train.close()
  assert batch["inputs"].shape == (16,) + tuple(c.dataset.input_shape)
  assert data.eval_batch == 16
  steps, per_epoch = from_config.total_steps(c, data.train_examples)
  assert (steps, per_epoch) == (2, 4.0)
  schedule = optim.make_schedule(c, steps, per_epoch)
  tx = optim.make_optimizer(c, schedule)
  sample = from_config.sample_inputs(c)
  batch = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  n_out = from_config.output_size(c)
  for method in config_utils.methods(c):
    obj = from_config.objective(c, method, mesh)

    def init():
      variables = ts.init_variables(module, jax.random.key(0), sample)
      variables = {**variables, **obj.init(sample.astype(jnp.float32))}
      return ts.create_train_state(variables, tx, jax.random.key(1), ema=c.ema_decay > 0)

    state = jax.eval_shape(init)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(state.params))
    step = functools.partial(ts.train_step, objective=obj, apply=adapters.make_apply(module),
                             tx=tx, schedule=schedule, ema_decay=c.ema_decay,
                             accum_steps=c.optimizer.grad_accum_steps)
    new_state, metrics = jax.eval_shape(step, state, batch)
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
    assert metrics["loss"].shape == () and "lr" in metrics and "grad_norm" in metrics
    if c.ema_decay:
      assert jax.tree_util.tree_structure(state.ema_params) == jax.tree_util.tree_structure(
          state.params)
  apply_eval = adapters.make_apply(module, train=False)
  logits, _ = jax.eval_shape(apply_eval, {"params": state.params, **state.model_state},
                             batch["inputs"])
  assert logits.shape == (16, n_out)
  erm = from_config.objective(c, "erm", mesh)
  eval_batch = next(iter(data.eval_batches()))
  assert eval_batch["inputs"].shape == (16,) + tuple(c.dataset.input_shape)
  sums = jax.eval_shape(functools.partial(
      ts.eval_step, apply=apply_eval, num_classes=c.dataset.num_classes, loss_fn=erm.loss_fn,
      to_logits=erm.to_logits), {"params": state.params, **state.model_state}, eval_batch)
  assert set(sums) == {"loss", "top1", "top5", "count", "calibration"}


@pytest.mark.parametrize("family", sorted(FAMILY_RUNS))
def test_backbone_family_trains_two_steps(family):
  """The recipe's first method (several in turn: `test_every_method_...`)."""
  name = FAMILY_RUNS[family]
  method = config_utils.methods(_load(name))[0]
  c = _load(name, [f"method={method}"])
  results = train.train_and_evaluate(c, None)
  _check_results(c, results, [method])


def test_every_method_trains_two_steps_on_the_smallest_recipe():
  c = _load("uci_mlp.py", ["method=" + ",".join(METHODS)])
  results = train.train_and_evaluate(c, None)
  _check_results(c, results, METHODS)
  assert {"amp_mask_frac", "mixupe_r"} <= set(results[METHODS.index("untied+amp+mixupe")]["train"])


def test_config_args_and_errors():
  def load(spec):
    return config_utils.load_config(os.path.join(ROOT, "configs", spec))
  c = load("imagenet_resnet50.py:res=64")
  assert c.dataset.input_shape == (64, 64, 3) and c.ema_decay == 0.999 and c.batch_size == 4096
  assert c.optimizer.lr == 1.6 and c.schedule.end_factor == 1e-3 and c.total_steps == 100_000
  vit = load("imagenet_vit_b16.py")
  assert (vit.optimizer.name, vit.optimizer.b2, vit.optimizer.weight_decay) == ("adamw", 0.99, 0.3)
  goyal = load("imagenet_resnet50_mixup.py:epochs=200")
  assert goyal.schedule.boundaries_epochs == (60, 120, 180) and goyal.batch_size == 1024
  with pytest.raises(ValueError, match="epochs must be 90 or 200"):
    load("imagenet_resnet50_mixup.py:epochs=10")
  with pytest.raises(ValueError, match="no config file"):
    config_utils.load_config("configs/nope.py")
  untied = load("cifar100_preactresnet18.py:paper=untied")
  assert untied.dataset.epoch_pairing and untied.mix.cosine_dim == 700
