"""Every config in configs/ loads, validates, and trains 2 steps on synthetic data (CPU).

Each recipe runs its own backbone and mixing point, shrunk by overrides
(`model.kwargs` for width and depth, 16x16 or 32x32 images, 12-token
sentences, batch 16), so each run costs a compile and two tiny steps.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

import train_testlib as lib
from mixjax import config_utils

import train  # noqa: E402

CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(lib.ROOT, "configs", "*.py"))
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


def _family(name: str) -> str:
  return next(f for f in sorted(TINY_KWARGS, key=len, reverse=True) if name.startswith(f))


def _load(name: str, extra=()):
  c = config_utils.load_config(os.path.join(lib.ROOT, "configs", name))
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
               "mix.erm_warmup_steps=0"]
  overrides += [f"model.kwargs.{k}={v}" for k, v in TINY_KWARGS[family].items()]
  c = config_utils.apply_overrides(c, overrides + list(extra))
  config_utils.validate(c)
  return c


def test_all_recipes_present():
  assert EXPECTED <= set(CONFIGS), EXPECTED - set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_trains_two_steps_on_synthetic_data(name):
  c = _load(name)
  results = train.train_and_evaluate(c, None)
  for r in results:
    assert r["step"] == 2
    assert np.isfinite(r["train"]["loss"]) and 0.0 <= r["eval"]["top1"] <= 1.0
    if c.ema_decay:
      assert "eval_ema" in r


METHODS = ["erm", "mixup", "untied", "dat", "amp", "mixupe", "untied+amp+mixupe"]


def test_every_method_runs_on_a_recipe():
  c = _load("cifar10_preactresnet18.py:paper=untied", ["method=" + ",".join(METHODS)])
  results = train.train_and_evaluate(c, None)
  assert [r["method"] for r in results] == METHODS
  assert all(np.isfinite(r["train"]["loss"]) for r in results)


def test_config_args_and_errors():
  c = config_utils.load_config(os.path.join(lib.ROOT, "configs", "imagenet_resnet50.py:res=64"))
  assert c.dataset.input_shape == (64, 64, 3) and c.ema_decay == 0.999 and c.batch_size == 4096
  assert c.optimizer.lr == 1.6 and c.schedule.end_factor == 1e-3 and c.total_steps == 100_000
  vit = config_utils.load_config(os.path.join(lib.ROOT, "configs", "imagenet_vit_b16.py"))
  assert (vit.optimizer.name, vit.optimizer.b2, vit.optimizer.weight_decay) == ("adamw", 0.99, 0.3)
  goyal = config_utils.load_config(
      os.path.join(lib.ROOT, "configs", "imagenet_resnet50_mixup.py:epochs=200"))
  assert goyal.schedule.boundaries_epochs == (60, 120, 180) and goyal.batch_size == 1024
  with pytest.raises(ValueError, match="epochs must be 90 or 200"):
    config_utils.load_config(os.path.join(lib.ROOT, "configs", "imagenet_resnet50_mixup.py:epochs=10"))
  with pytest.raises(ValueError, match="no config file"):
    config_utils.load_config("configs/nope.py")
  untied = config_utils.load_config(
      os.path.join(lib.ROOT, "configs", "cifar100_preactresnet18.py:paper=untied"))
  assert untied.dataset.epoch_pairing and untied.mix.cosine_dim == 700
