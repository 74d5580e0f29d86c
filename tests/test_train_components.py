"""Unit tests of config_utils, optim, metrics_writer and checkpointing."""

from __future__ import annotations

import json
import math
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mixjax import checkpointing
from mixjax import config_utils as cu
from mixjax import from_config
from mixjax import metrics_writer as mw
from mixjax import optim

# ----------------------------------------------------------------------------- config_utils


def test_overrides_are_typed_and_unknown_keys_fail_with_suggestion():
  c = cu.base_config()
  c2 = cu.apply_overrides(c, ["optimizer.lr=0.5", "mix.beta=0.9", "dataset.input_shape=(4, 4, 1)",
                              "mix.interpolate=false", "method=untied+amp", "model.kwargs.width=4",
                              "total_steps=7"])
  assert c2.optimizer.lr == 0.5 and c2.mix.beta == 0.9 and c2.dataset.input_shape == (4, 4, 1)
  assert c2.mix.interpolate is False and c2.method == "untied+amp" and c2.model.kwargs.width == 4
  assert c.optimizer.lr == 0.1  # the original is untouched
  with pytest.raises(ValueError, match=r"Unknown config key 'optimizer\.lrr'.*optimizer\.lr"):
    cu.apply_overrides(c, ["optimizer.lrr=0.5"])
  with pytest.raises(ValueError, match="total_steps"):
    cu.apply_overrides(c, ["total_steps=abc"])
  with pytest.raises(ValueError, match="boolean"):
    cu.apply_overrides(c, ["mix.interpolate=maybe"])
  with pytest.raises(ValueError, match="key=value"):
    cu.apply_overrides(c, ["optimizer.lr"])


def test_split_argv_and_parse_arg():
  rest, ov = cu.split_argv(["--config", "x.py", "--config.a.b=1", "--config.c", "2", "--workdir=w"])
  assert rest == ["--config", "x.py", "--workdir=w"] and ov == ["a.b=1", "c=2"]
  a = cu.parse_arg("res=64,runlocal", res=224, runlocal=False, method="mixup")
  assert a.res == 64 and a.runlocal is True and a.method == "mixup"
  with pytest.raises(ValueError, match="Unknown config argument 'rez'"):
    cu.parse_arg("rez=64", res=224)


def test_validate_rejects_bad_values():
  def bad(match, **changes):
    c = cu.base_config()
    c.total_steps = 10
    c.update_from_flattened_dict(changes)
    with pytest.raises(ValueError, match=match):
      cu.validate(c)
  bad("mixupp", method="mixupp")
  bad("needs a mixing base", method="erm+amp")
  bad("optimizer.name", **{"optimizer.name": "lamb"})
  bad("dataset.name", **{"dataset.name": "cifar"})
  bad("tfds_name", **{"dataset.name": "tfds"})
  bad("grad_accum_steps", batch_size=10, **{"optimizer.grad_accum_steps": 3})
  bad("total_steps or config.num_epochs", total_steps=0)
  bad("ema_decay", ema_decay=1.0)
  bad("mix.point", **{"dataset.input_dtype": "int32"})
  bad("reverse", **{"dataset.epoch_pairing": True})
  # Allowed values come from the registries (methods.parse, pairing, amp, mixupe).
  bad(r"config\.mix\.pairing='shuffle'.*same_class", **{"mix.pairing": "shuffle"})
  bad(r"config\.amp\.mode='half'", **{"amp.mode": "half"})
  bad(r"config\.mixupe\.clean_pass='twice'", **{"mixupe.clean_pass": "twice"})
  bad(r"config\.method: Unknown method 'mixup\+amp\+amp'", method="mixup+amp+amp")
  c = cu.base_config()
  c.total_steps = 10
  cu.validate(c)
  c.method = "erm+mixupe,mixup"  # MixupE's Table 7 row: ERM plus MixupE's term.
  cu.validate(c)
  assert cu.methods(c) == ["erm+mixupe", "mixup"]
  c.bogus = 1
  with pytest.raises(ValueError, match="bogus"):
    cu.validate(c)


def test_from_config_model_and_total_steps():
  c = cu.base_config()
  c.model.name, c.dataset.input_shape = "mlp", (4,)
  c.model.kwargs = cu.ConfigDict({"hidden_sizes": (8,)})
  c.mix.loss, c.mix.cosine_dim = "cosine", 12
  module = from_config.model(c)
  out = jax.eval_shape(lambda: module.init_with_output(jax.random.key(0), jnp.zeros((2, 4)))[0])
  assert out.shape == (2, 12)  # The negative-cosine loss: cosine_dim outputs.
  c.model.kwargs.bogus = 1
  with pytest.raises(ValueError, match=r"config\.model\.kwargs \['bogus', 'hidden_sizes'\].*'mlp'"):
    from_config.model(c)
  c.batch_size, c.num_epochs = 32, 2.5
  assert from_config.total_steps(c, 100) == (8, 100 / 32)
  c.total_steps = 5
  assert from_config.total_steps(c, 100) == (5, 100 / 32)


# ----------------------------------------------------------------------------- optim


def _cfg(**kw):
  c = cu.base_config()
  c.update_from_flattened_dict(kw)
  return c


def test_warmup_cosine_schedule_matches_formula():
  c = _cfg(**{"optimizer.lr": 1.6, "schedule.warmup_steps": 10, "schedule.end_factor": 1e-3})
  s = optim.make_schedule(c, 100, 10.0)
  for t in (0, 5, 10, 37, 99, 100):
    if t < 10:
      want = 1.6 * t / 10
    else:
      frac = (t - 10) / 90
      want = 1.6e-3 + (1.6 - 1.6e-3) * 0.5 * (1 + math.cos(math.pi * frac))
    assert float(s(t)) == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_goyal_piecewise_schedule():
  # Mixup paper: 0.1 -> 0.4 over 5 epochs, / 10 at epochs 30, 60, 80.
  c = _cfg(**{"optimizer.lr": 0.4, "schedule.name": "piecewise", "schedule.warmup_epochs": 5.0,
              "schedule.warmup_init": 0.25, "schedule.boundaries_epochs": (30, 60, 80)})
  spe = 100.0
  s = optim.make_schedule(c, 9000, spe)
  assert float(s(0)) == pytest.approx(0.1)
  assert float(s(250)) == pytest.approx(0.25)
  for epoch, want in ((10, 0.4), (29.99, 0.4), (30, 0.04), (59, 0.04), (61, 0.004), (85, 0.0004)):
    assert float(s(int(epoch * spe))) == pytest.approx(want, rel=1e-5), epoch


def test_weight_decay_mask_and_sgd_l2():
  params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.ones(4)},
            "bn": {"scale": jnp.ones(4), "bias": jnp.ones(4)}, "dense": {"kernel": jnp.ones((4, 2))}}
  mask = optim.decay_mask(params)
  assert mask == {"conv": {"kernel": True, "bias": False}, "bn": {"scale": False, "bias": False},
                  "dense": {"kernel": True}}
  c = _cfg(**{"optimizer.name": "sgd", "optimizer.lr": 0.1, "optimizer.momentum": 0.0,
              "optimizer.weight_decay": 0.01})
  tx = optim.make_optimizer(c, optax.constant_schedule(0.1))
  grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  upd, _ = tx.update(grads, tx.init(params), params)
  # Zero gradient: only decayed leaves move, by -lr * wd * w.
  np.testing.assert_allclose(upd["conv"]["kernel"], -0.1 * 0.01)
  np.testing.assert_allclose(upd["bn"]["scale"], 0.0)
  np.testing.assert_allclose(upd["conv"]["bias"], 0.0)
  c.optimizer.grad_clip_norm = 1.0
  c.optimizer.weight_decay = 0.0
  tx = optim.make_optimizer(c, optax.constant_schedule(1.0))
  big = jax.tree_util.tree_map(lambda p: 100 * jnp.ones_like(p), params)
  upd, _ = tx.update(big, tx.init(params), params)
  assert float(optax.tree.norm(upd)) == pytest.approx(1.0, rel=1e-5)


def test_adamw_decoupled_decay_masked():
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
  c = _cfg(**{"optimizer.name": "adamw", "optimizer.weight_decay": 0.3})
  tx = optim.make_optimizer(c, optax.constant_schedule(1e-3))
  upd, _ = tx.update(jax.tree_util.tree_map(jnp.zeros_like, params), tx.init(params), params)
  np.testing.assert_allclose(upd["w"], -1e-3 * 0.3, rtol=1e-6)
  np.testing.assert_allclose(upd["b"], 0.0)


def test_ema_update():
  ema = {"a": jnp.array([1.0, 2.0]), "bn": {"mean": jnp.array(3.0)}}
  new = {"a": jnp.array([3.0, 6.0]), "bn": {"mean": jnp.array(5.0)}}
  out = optim.ema_update(ema, new, 0.75)
  np.testing.assert_allclose(out["a"], [1.5, 3.0])
  np.testing.assert_allclose(out["bn"]["mean"], 3.5)


# ----------------------------------------------------------------------------- metrics


def test_crc32c_and_tfrecord_event_roundtrip(tmp_path):
  assert mw.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
  assert mw.crc32c(b"") == 0
  w = mw.TensorBoardWriter(str(tmp_path))
  w.scalars(7, {"train/loss": 0.5})
  w.close()
  records = mw.read_tfrecords(w.path)
  assert len(records) == 2 and b"brain.Event:2" in records[0]
  ev = records[1]
  # Event: wall_time (field 1, fixed64), step (field 2, varint 7), summary (field 5).
  assert ev[0] == 0x09 and ev[9:11] == b"\x10\x07" and ev[11] == 0x2A
  assert b"train/loss" in ev and struct.pack("<f", 0.5) in ev
  with open(w.path, "r+b") as f:  # damage a byte: the CRC check must notice
    f.seek(-6, 2)
    f.write(b"\xff")
  with pytest.raises(ValueError, match="CRC"):
    mw.read_tfrecords(w.path)


def test_metrics_writer_jsonl_csv_and_truncate(tmp_path):
  w = mw.MetricsWriter(str(tmp_path))
  for s in (1, 2, 3):
    w.write(s, "train", {"loss": 1.0 / s, "lr": np.float32(0.1)})
  w.write(3, "eval", {"top1": 0.5})
  w.write(4, "train", {"loss": 0.2, "lr": 0.1, "new": 1.0})
  w.close()
  recs = mw.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in recs] == [1, 2, 3, 3, 4]
  lines = (tmp_path / "train.csv").read_text().splitlines()
  assert lines[0].split(",")[-1] == "new" and len(lines) == 5
  w2 = mw.MetricsWriter(str(tmp_path), tensorboard=False)
  w2.truncate(2)
  assert [r["step"] for r in mw.read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1, 2]
  assert len((tmp_path / "train.csv").read_text().splitlines()) == 3
  assert not (tmp_path / "eval.csv").exists()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 9, "kin')  # a line torn by a kill is skipped
  assert len(mw.read_jsonl(str(tmp_path / "metrics.jsonl"))) == 2
  assert json.loads(json.dumps(mw._clean(float("nan")))) == "nan"


# ----------------------------------------------------------------------------- checkpointing


def test_checkpointer_keeps_last_k_and_restores_exactly(tmp_path):
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  ck = checkpointing.Checkpointer(str(tmp_path / "ck"), keep=2)
  state = {"w": jax.device_put(jnp.arange(6.0), rep), "step": jnp.int32(0), "ema": {}}
  for s in (1, 2, 3):
    ck.save(s, jax.tree_util.tree_map(lambda x: x * s, state), {"step": s, "data": {"step": s}})
  ck.wait()
  assert ck.steps() == [2, 3]
  restored, meta = ck.restore_latest(state)
  np.testing.assert_array_equal(restored["w"], np.arange(6.0) * 3)
  assert restored["w"].sharding == rep and meta == {"step": 3, "data": {"step": 3}}
  ck.close()
  empty = checkpointing.Checkpointer(str(tmp_path / "none"))
  assert empty.restore_latest(state) is None
  empty.close()
  with pytest.raises(ValueError, match="keep"):
    checkpointing.Checkpointer(str(tmp_path / "x"), keep=0)


def test_checksums_change_with_any_word_and_not_with_sharding():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  x = jnp.arange(64.0, dtype=jnp.float32).reshape(8, 8)
  tree = {"x": x, "b": jnp.ones(3, jnp.bfloat16), "i": jnp.arange(3), "f": jnp.array([True])}
  base = {r["path"]: r["checksum"] for r in checkpointing.inspect(tree)}
  split = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  assert checkpointing.inspect({**tree, "x": split})[3]["checksum"] == base["['x']"]
  flipped = np.asarray(x).copy().view(np.uint32)
  flipped[5, 3] ^= 1 << 30  # one bit
  swapped = np.asarray(x).copy()
  swapped[0, 0], swapped[0, 1] = swapped[0, 1], swapped[0, 0]
  for bad in (flipped.view(np.float32), swapped):
    assert checkpointing.inspect({"x": jnp.asarray(bad)})[0]["checksum"] != base["['x']"]
  recs = checkpointing.inspect({"ok": x, "nan": jnp.array([1.0, jnp.nan])})
  assert [r["finite"] for r in recs] == [False, True]  # leaves in sorted key order
