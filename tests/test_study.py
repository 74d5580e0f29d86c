"""A study: methods over seeds, FGSM and corrupted labels, summarised as one table."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import train
import train_testlib as lib
from mixjax import config_utils, study


def test_fgsm_error_of_a_linear_model_matches_numpy():
  """For logits W x, FGSM moves x by eps * sign(W_other - W_true) summed through softmax."""
  rng = np.random.default_rng(0)
  w = rng.normal(size=(4, 3)).astype(np.float32)
  x = rng.uniform(0.2, 0.8, size=(30, 4)).astype(np.float32)
  y = rng.integers(0, 3, 30).astype(np.int32)
  x[0, 0], x[1, 1] = 0.0, 1.0  # The input range is [0, 1].
  mask = (np.arange(30) < 28).astype(np.float32)
  batches = [{"inputs": x[:15], "labels": y[:15], "mask": mask[:15]},
             {"inputs": x[15:], "labels": y[15:], "mask": mask[15:]}]
  err = study.fgsm_error(lambda v: v @ jnp.asarray(w), batches, 0.1)
  z = x @ w
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  grad = (p - np.eye(3)[y]) @ w.T  # d CE / d x.
  x_adv = np.clip(x + 0.1 * np.sign(grad), 0.0, 1.0)
  wrong = (np.argmax(x_adv @ w, -1) != y)[:28]
  assert err == pytest.approx(wrong.mean())
  assert 0 < wrong.sum()  # The attack does something here.


def test_study_runs_each_method_over_seeds_and_writes_the_table(tmp_path, capsys):
  c = lib.tiny_config(3, "mixup")
  c.dataset.name = "digits"
  c.dataset.augment = "none"
  c.dataset.train_examples = c.dataset.eval_examples = 0
  c.dataset.input_shape = (8, 8, 1)
  c.dataset.num_classes = 10
  c.eval_batch_size = 360
  c.study.seeds = 2
  c.study.fgsm_eps = 0.05
  c.study.corrupted_labels = 0.2
  config_utils.validate(c)
  results = train.train_and_evaluate(c, str(tmp_path))
  assert len(results) == 4  # 2 seeds x (clean, corrupted).
  assert all("fgsm_top1" in r["eval"] and 0 <= r["eval"]["ece"] <= 1 for r in results)
  out = capsys.readouterr().out
  assert ("| method | test error % | NLL | ECE % | confidence - accuracy % | FGSM error % | "
          "error, corrupted labels % |") in out
  assert "2 seeds (0, 1)" in out and "| mixup |" in out
  table = (tmp_path / "summary.md").read_text()
  data = json.loads((tmp_path / "summary.json").read_text())
  assert table.strip() in out
  assert len(data["methods"]["mixup"]["error"]) == 2
  assert len(data["methods"]["mixup"]["corrupted_error"]) == 2
  clean = sorted(1 - r["eval"]["top1"] for r in results[:2])
  assert sorted(data["methods"]["mixup"]["error"]) == pytest.approx(clean)
  gaps = sorted(r["eval"]["confidence"] - r["eval"]["top1"] for r in results[:2])
  assert sorted(data["methods"]["mixup"]["overconfidence"]) == pytest.approx(gaps)
  assert all(0 < r["eval"]["confidence"] <= 1 for r in results)
  assert (tmp_path / "mixup" / "seed1_corrupt0.2" / "checkpoints").is_dir()


def test_study_settings_are_validated():
  c = config_utils.base_config()
  c.total_steps = 1
  for key, value in (("seeds", 0), ("seeds", 1.5), ("fgsm_eps", -0.1), ("corrupted_labels", 1.0)):
    with pytest.raises(ValueError, match=f"study.{key}"):
      config_utils.validate(config_utils.apply_overrides(c, [f"study.{key}={value}"]))
