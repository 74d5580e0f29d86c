"""End-to-end tests of the training system (train.py, train_step, checkpointing).

Kept small: tiny models on 8x8 inputs, a few steps. The subprocess tests (kill
and resume, two processes with jax.distributed) have hard timeouts.
"""

from __future__ import annotations

import ast
import functools
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import train
import train_testlib as lib
from mixjax import adapters
from mixjax import compilation_cache as cache_lib
from mixjax import config_utils
from mixjax import objectives
from mixjax import pairing
from mixjax import policies
from mixjax import train_step as ts

ROOT = lib.ROOT
TESTLIB = os.path.join(ROOT, "tests", "train_testlib.py")
STEPS, CKPT_EVERY = 40, 8  # The resume tests' run: 40 steps, a checkpoint every 8.


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """Identical programs compiled by several runs (and subprocesses) compile once."""
  with lib.compilation_cache(str(tmp_path_factory.mktemp("jax_cache"))) as path:
    yield path


def _resume_config():
  c = lib.tiny_config(STEPS)
  c.checkpoint_every_steps = CKPT_EVERY
  return c


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run of `_resume_config()`: (workdir, result)."""
  w = str(tmp_path_factory.mktemp("reference"))
  c = _resume_config()
  return w, train.train_one(c, c.method, w, model=lib.TinyResNet())


# ----------------------------------------------------------------------------- digits (README)


def test_digits_mixup_and_erm_reach_high_accuracy():
  """A shortened `python train.py` (one seed, clean labels): ERM then mixup, well above chance."""
  c = config_utils.load_config(os.path.join(ROOT, "configs", "digits.py:steps=300,seeds=1"))
  c.progress_bar = False
  c.study.corrupted_labels = c.study.fgsm_eps = 0.0
  results = train.train_and_evaluate(c, None, model=lib.TinyCNN())
  assert [r["method"] for r in results] == ["erm", "mixup"]
  for r in results:
    assert r["step"] == 300
    assert r["eval"]["top1"] >= 0.93, r["eval"]
  # The two runs differ only by the objective: mixup's train loss is far higher.
  assert results[1]["train"]["loss"] > 5 * results[0]["train"]["loss"]


# ----------------------------------------------------------------------------- sharding


def _run_steps(mesh: Mesh, objective, n_steps: int = 3):
  module = lib.TinyResNet(num_classes=10)
  tx = optax.sgd(0.1, momentum=0.9)
  rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  variables = ts.init_variables(module, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  state = jax.device_put(ts.create_train_state(variables, tx, jax.random.key(1), ema=True), rep)
  step = jax.jit(functools.partial(ts.train_step, objective=objective,
                                   apply=adapters.make_apply(module), tx=tx, ema_decay=0.5),
                 in_shardings=(rep, shard), out_shardings=(rep, rep))
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(n_steps):
    batch = {"inputs": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
             "labels": rng.integers(0, 10, 16).astype(np.int32)}
    state, m = step(state, jax.device_put(batch, shard))
    losses.append(float(m["loss"]))
  return jax.device_get(state), losses


def _assert_trees_close(a, b, atol=2e-5):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol, rtol=1e-4), a, b)


def test_eight_devices_match_one_device_global_pairing():
  assert len(jax.devices()) == 8
  obj = objectives.mixup(policies.mixup(1.0), num_classes=10)
  s8, l8 = _run_steps(Mesh(np.array(jax.devices()), ("data",)), obj)
  s1, l1 = _run_steps(Mesh(np.array(jax.devices()[:1]), ("data",)), obj)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  _assert_trees_close(s8.params, s1.params)
  # Batch norm statistics are global-batch statistics, the EMA follows them.
  _assert_trees_close(s8.model_state, s1.model_state)
  _assert_trees_close(s8.ema_model_state, s1.ema_model_state)
  assert not np.allclose(s8.params["Dense_0"]["kernel"], s8.ema_params["Dense_0"]["kernel"])


def test_eight_devices_shard_local_pairing_match_grouped_single_device():
  mesh8 = Mesh(np.array(jax.devices()), ("data",))
  local = objectives.mixup(policies.mixup(1.0), num_classes=10, mesh=mesh8)
  grouped = objectives.mixup(policies.mixup(1.0), pairing.grouped(pairing.random_permutation, 8),
                             num_classes=10)
  s8, l8 = _run_steps(mesh8, local)
  s1, l1 = _run_steps(Mesh(np.array(jax.devices()[:1]), ("data",)), grouped)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  _assert_trees_close(s8.params, s1.params)


def test_gradient_accumulation_equals_full_batch():
  module = lib.TinyMLP(num_classes=5)
  tx = optax.adam(1e-2)
  variables = ts.init_variables(module, jax.random.key(0), jnp.zeros((1, 6)))
  batch = {"inputs": jax.random.normal(jax.random.key(2), (12, 6)),
           "labels": jnp.arange(12) % 5}
  out = {}
  for k in (1, 4):
    state = ts.create_train_state(variables, tx, jax.random.key(1), ema=False)
    fn = jax.jit(functools.partial(ts.train_step, objective=objectives.erm(num_classes=5),
                                   apply=adapters.make_apply(module), tx=tx, accum_steps=k))
    for _ in range(2):
      state, m = fn(state, batch)
    out[k] = (state, m)
  _assert_trees_close(out[1][0].params, out[4][0].params, atol=1e-6)
  np.testing.assert_allclose(out[1][1]["loss"], out[4][1]["loss"], rtol=1e-6)


# ----------------------------------------------------------------------------- NaN


def test_nan_loss_stops_naming_the_step_and_never_saves_nan(tmp_path):
  c = lib.tiny_config(steps=12)
  c.optimizer.lr = 1e18  # Blows up after the first update.
  c.optimizer.weight_decay = 0.0
  c.nan_policy = "skip"
  skip = train.train_one(c, "erm", None, model=lib.TinyMLP())
  assert skip["skipped_steps"], "the blow-up should produce non-finite steps"
  first = skip["skipped_steps"][0]
  leaves = jax.tree_util.tree_leaves(jax.device_get(skip["state"].params))
  assert all(np.all(np.isfinite(x)) for x in leaves)
  assert int(skip["state"].skipped) == len(skip["skipped_steps"])

  c.nan_policy = "stop"
  with pytest.raises(FloatingPointError, match=f"at step {first}\\b"):
    train.train_one(c, "erm", str(tmp_path), model=lib.TinyMLP())
  from mixjax import checkpointing
  ck = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
  assert all(s <= first for s in ck.steps())
  for s in ck.steps():  # restore() rejects non-finite values
    ck.restore(s, skip["state"])
  ck.close()


# ----------------------------------------------------------------------------- resume


def test_resume_in_process_continues_exactly(tmp_path, reference):
  ref_dir, ref = reference
  c = _resume_config()
  w = str(tmp_path / "w")
  part = train.train_one(c, c.method, w, model=lib.TinyResNet(), max_steps=20)
  assert part["step"] == 20 and max(lib.train_losses(w)) == 20
  rest = train.train_one(c, c.method, w, model=lib.TinyResNet())
  assert rest["step"] == STEPS
  assert lib.train_losses(w) == lib.train_losses(ref_dir)
  _assert_trees_close(jax.device_get(rest["state"]), jax.device_get(ref["state"]), atol=0)
  assert rest["eval_ema"] == ref["eval_ema"] and rest["eval"] == ref["eval"]


_free_port = lib.free_port
_spawn = lib.spawn


def _wait_for_step(workdir: str, step: int, proc, timeout: float = 90.0) -> None:
  t0 = time.time()
  while time.time() - t0 < timeout:
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path) and max(lib.train_losses(workdir), default=0) >= step:
      return
    if proc.poll() is not None:
      raise AssertionError(f"training exited early:\n{proc.stdout.read()}")
    time.sleep(0.1)
  proc.kill()
  raise AssertionError("timed out waiting for training to progress")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_run_resumes_like_uninterrupted(tmp_path, sig, reference):
  ref_dir, ref = reference
  w = str(tmp_path / "w")
  proc = _spawn([w, STEPS, "--sleep", "0.1", "--ckpt_every", CKPT_EVERY])
  _wait_for_step(w, 13, proc)
  proc.send_signal(sig)
  out, _ = proc.communicate(timeout=60)
  if sig == signal.SIGTERM:
    assert proc.returncode == 0, out
    assert "SIGTERM: saved step" in out and "preempted" in out, out
  else:
    assert proc.returncode == -signal.SIGKILL
  done = max(lib.train_losses(w))
  assert 13 <= done < STEPS, "the run should have been interrupted mid-way"
  c = _resume_config()
  rest = train.train_one(c, c.method, w, model=lib.TinyResNet())
  assert rest["step"] == STEPS
  assert lib.train_losses(w) == lib.train_losses(ref_dir)
  _assert_trees_close(jax.device_get(rest["state"].params), jax.device_get(ref["state"].params),
                      atol=0)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax internals
def test_corrupted_latest_checkpoint_falls_back_to_previous(tmp_path, capsys, reference):
  ref_dir, ref = reference
  c = _resume_config()
  w = str(tmp_path / "w")
  train.train_one(c, c.method, w, model=lib.TinyResNet(), max_steps=16)
  ckdir = os.path.join(w, "checkpoints")
  assert sorted(int(s) for s in os.listdir(ckdir) if s.isdigit()) == [8, 16]
  # Damage the data files of step 16's state (as a disk error or a partial copy would).
  damaged = 0
  for root, _, files in os.walk(os.path.join(ckdir, "16", "state")):
    for f in files:
      if "manifest" in f or root.endswith("/d"):
        with open(os.path.join(root, f), "r+b") as fh:
          fh.truncate(3)
        damaged += 1
  assert damaged
  capsys.readouterr()
  rest = train.train_one(c, c.method, w, model=lib.TinyResNet())
  out = capsys.readouterr().out
  assert "Checkpoint" in out and "unreadable" in out and "resumed from step 8" in out, out
  moved = os.listdir(os.path.join(w, "checkpoints_corrupt"))
  assert len(moved) == 1 and moved[0].startswith("16-")  # kept, not deleted
  assert lib.train_losses(w) == lib.train_losses(ref_dir)
  _assert_trees_close(jax.device_get(rest["state"].params), jax.device_get(ref["state"].params),
                      atol=0)


# ----------------------------------------------------------------------------- multi-process


@pytest.mark.parametrize("fsdp", [1, 2])
def test_two_processes_match_one_process(tmp_path, fsdp):
  """2 processes x 2 CPU devices (jax.distributed, gloo) == 1 process x 4 devices.

  fsdp=2: mesh data=2 x fsdp=2, the large kernels split across the two processes.
  """
  steps, port, width = 4, _free_port(), 8 if fsdp == 1 else 64
  w2 = str(tmp_path / "two")
  procs = [_spawn([w2, steps, "--mesh_data", 4 // fsdp, "--mesh_fsdp", fsdp, "--width", width,
                   "--ckpt_every", 100 if fsdp == 1 else 2, "--distributed",
                   f"127.0.0.1:{port}", 2, i], env_devices=2) for i in range(2)]
  outs = lib.communicate(procs, timeout=150)
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
    want = "P(None, None, None, 'fsdp')" if fsdp == 2 else "P()"
    assert f"LARGEST (3, 3, {width}, {width}) {want}" in out, out
  c = lib.tiny_config(steps)
  c.mesh_data = 4
  c.checkpoint_every_steps = 100
  w1 = str(tmp_path / "one")
  one = train.train_one(c, c.method, w1, model=lib.TinyResNet(width=width))
  two_params = np.load(os.path.join(w2, "final_params.npy"))
  one_params = np.concatenate([np.asarray(x).ravel() for x in
                               jax.tree_util.tree_leaves(jax.device_get(one["state"].params))])
  np.testing.assert_allclose(two_params, one_params, atol=2e-6)
  assert lib.train_losses(w2) == pytest.approx(lib.train_losses(w1), rel=1e-5)


# ----------------------------------------------------------------------------- CLI


def test_cli_rejects_unknown_keys_before_compiling(capsys):
  code = train.main(["--config", os.path.join(ROOT, "configs", "digits.py"),
                     "--config.optimizer.lrr=0.1"])
  assert code == 2
  err = capsys.readouterr().err
  assert "optimizer.lrr" in err and "optimizer.lr" in err
  code = train.main(["--config", os.path.join(ROOT, "configs", "digits.py"),
                     "--config.method=mixupp"])
  assert code == 2 and "mixupp" in capsys.readouterr().err


def test_bf16_compute_keeps_f32_master_weights():
  import flax.linen as nn

  class Bf16MLP(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train=False):
      x = x.reshape(x.shape[0], -1)
      x = nn.relu(nn.Dense(16, dtype=jnp.bfloat16)(x))
      return nn.Dense(self.num_classes, dtype=jnp.bfloat16)(x)

  c = lib.tiny_config(4)
  res = train.train_one(c, "mixup", None, model=Bf16MLP())
  params = jax.tree_util.tree_leaves(res["state"].params)
  assert all(p.dtype == jnp.float32 for p in params)
  assert np.isfinite(res["train"]["loss"]) and 0 <= res["eval"]["top1"] <= 1


# ----------------------------------------------------------------------------- first hour


def test_help_lists_recipes_methods_datasets_and_every_key(capsys):
  from mixjax import amp, methods, mixupe
  with pytest.raises(SystemExit) as e:
    train.main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  for name in os.listdir(os.path.join(ROOT, "configs")):  # Each recipe with its purpose.
    with open(os.path.join(ROOT, "configs", name)) as f:
      first = ast.get_docstring(ast.parse(f.read())).split("\n")[0]
    assert f"configs/{name}" in out and first.strip() in out, name
  for word in methods.BASES + methods.WRAPPERS + config_utils.DATASETS + amp.MODES:
    assert word in out, word
  assert str(list(mixupe.CLEAN_PASSES)) in out and str(list(mixupe.BATCH_STATS)) in out
  assert "'same_class'" in out and "python train.py --config configs/cifar10" in out
  for key, default in config_utils._flatten(config_utils.base_config()).items():
    default = default.to_dict() if hasattr(default, "to_dict") else default
    assert f"  {key} = {default!r}" in out, key
  # A recipe's values, with the default where they differ.
  uci = os.path.join(ROOT, "configs", "uci_mlp.py")
  with pytest.raises(SystemExit):
    train.main(["--config", uci, "--config.help", "--config.batch_size=7"])
  out = capsys.readouterr().out
  assert "  batch_size = 7  (default 128)" in out and "dataset.name = 'iris'" in out


def test_choices_are_what_validate_accepts():
  """Every listed value passes `validate`; an unlisted one fails naming the key."""
  for key, allowed in config_utils.choices().items():
    if key == "method":
      continue
    values = ast.literal_eval(allowed)
    for value in values + ["no_such_value"]:
      c = lib.tiny_config()
      node, leaf = c, key
      if "." in key:
        group, leaf = key.split(".")
        node = c[group]
      node[leaf] = value
      if key == "dataset.name" and value == "tfds":
        c.dataset.tfds_name = "mnist"
      if key == "dataset.input_dtype" and value == "int32":
        c.mix.point = "Dense_0"
      if key == "mix.pairing" and value != "reverse":
        c.dataset.epoch_pairing = False
      if key == "mix.lam_scope" and value == "pair":
        c.mix.pairing = "reverse"  # timm's mode='pair' is defined on the flipped batch.
      if value == "no_such_value":
        with pytest.raises(ValueError, match=key):
          config_utils.validate(c)
      else:
        config_utils.validate(c)


TINY_RECIPE = '''"""A tiny synthetic run: an MLP on 4 features, a few steps."""
from mixjax import config_utils


def get_config(arg=None):
  c = config_utils.base_config()
  c.model.name = "mlp"
  c.dataset.name = "synthetic"
  c.dataset.input_shape = (4,)
  c.dataset.num_classes = 3
  c.dataset.train_examples = 64
  c.dataset.eval_examples = 32
  c.batch_size = 16
  c.total_steps = 6
  c.log_every_steps = 3
  c.progress_bar = False
  return c
'''


def _train_py(args, cache_dir, tmp_path):
  """Runs `python train.py ARGS` with MIXJAX_CACHE_DIR=cache_dir; returns (rc, output)."""
  recipe = tmp_path / "tiny_recipe.py"
  recipe.write_text(TINY_RECIPE)
  env = dict(os.environ, MIXJAX_CACHE_DIR=str(cache_dir), PYTHONPATH=ROOT)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", str(recipe)]
                        + list(args), env=env, capture_output=True, text=True, timeout=240)
  return proc.returncode, proc.stdout + proc.stderr


def test_second_run_compiles_from_the_persistent_cache(tmp_path):
  cache = tmp_path / "cache"
  rc, out = _train_py(["--workdir", tmp_path / "one"], cache, tmp_path)
  assert rc == 0, out
  assert "compiling the train step..." in out and "compiled the train step in" in out, out
  # Small programs near the 0.1 s threshold may or may not be kept; the steps are.
  steps = lambda: sorted(f for f in os.listdir(cache)  # noqa: E731
                         if f.startswith(("jit_train_step", "jit_eval_step", "jit_init")))
  first = steps()
  assert len(first) == 3, first
  rc, out = _train_py(["--workdir", tmp_path / "two"], cache, tmp_path)
  assert rc == 0, out
  assert steps() == first, "the second run should load its steps from the cache"
  # img/s leaves the compile step out: every record's rate is positive (none is 0).
  from mixjax import metrics_writer
  rates = [r.get("images_per_s") for r in
           metrics_writer.read_jsonl(str(tmp_path / "two" / "metrics.jsonl"))
           if r["kind"] == "train"]
  assert rates and all(r is None or r > 0 for r in rates) and rates[-1] > 0, rates


def test_compilation_cache_location_and_opt_out(tmp_path, monkeypatch):
  monkeypatch.setenv("MIXJAX_CACHE_DIR", str(tmp_path / "c"))
  assert cache_lib.use(disable=True) is None
  monkeypatch.setenv("MIXJAX_NO_COMPILATION_CACHE", "1")
  assert cache_lib.use() is None and not os.path.exists(tmp_path / "c")
  monkeypatch.delenv("MIXJAX_NO_COMPILATION_CACHE")
  old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  try:
    assert cache_lib.use() == str(tmp_path / "c")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
    assert jax.config.jax_persistent_cache_min_compile_time_secs <= 0.1
  finally:
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


def test_progress_bar_restart_clock_drops_the_compile_time():
  from mixjax import metrics_writer
  bar = metrics_writer.ProgressBar(100, 0, "x")
  bar.update(1)
  time.sleep(0.3)  # The compile step.
  bar.update(1)
  bar.restart_clock()
  bar.update(3)
  d = bar._bar.format_dict
  bar.close()
  assert d["n"] == 5 and d["initial"] == 2 and d["elapsed"] < 0.25, d


def test_rerunning_a_finished_run_writes_nothing(tmp_path, reference, capsys):
  import shutil
  ref_dir, ref = reference
  w = str(tmp_path / "w")
  shutil.copytree(ref_dir, w)
  logs = {f: open(os.path.join(w, f), "rb").read() for f in ("metrics.jsonl", "eval.csv",
                                                              "train.csv")}
  tb = sorted(os.listdir(os.path.join(w, "tb")))
  c = _resume_config()
  capsys.readouterr()
  again = train.train_and_evaluate(c, w, model=lib.TinyResNet())[0]
  out = capsys.readouterr().out
  assert "already finished: step 40" in out and "test accuracy" in out, out
  assert again["already_finished"] and again["step"] == STEPS
  assert again["eval"] == ref["eval"] and again["eval_ema"] == ref["eval_ema"]
  for f, blob in logs.items():
    assert open(os.path.join(w, f), "rb").read() == blob, f
  assert sorted(os.listdir(os.path.join(w, "tb"))) == tb
  _assert_trees_close(jax.device_get(again["state"].params), jax.device_get(ref["state"].params),
                      atol=0)


def test_config_and_device_checks_fail_before_loading_data(monkeypatch):
  def no_data(*args, **kwargs):
    raise AssertionError("data was loaded before the config checks")
  monkeypatch.setattr(train.from_config, "data", no_data)
  c = lib.tiny_config(steps=12)
  c.mesh_data = 8
  c.batch_size = 12  # Not a multiple of the 8 devices.
  with pytest.raises(ValueError, match=r"batch_size=12 .* multiple of 8.*batch_size=16"):
    train.train_one(c, c.method, None, model=lib.TinyMLP())
  c.batch_size = 16
  c.schedule.warmup_steps = 20  # Longer than total_steps=12.
  with pytest.raises(ValueError, match="warm-up"):
    train.train_one(c, c.method, None, model=lib.TinyMLP())
  c.schedule.warmup_steps = 0
  c.total_steps, c.num_epochs, c.schedule.warmup_epochs = 0, 1.0, 2.0  # Synthetic: 16 steps/epoch.
  with pytest.raises(ValueError, match="warm-up"):
    train.train_one(c, c.method, None, model=lib.TinyMLP())
  c.schedule.warmup_epochs = 0.5  # Passes the checks: the data is loaded next.
  with pytest.raises(AssertionError, match="data was loaded"):
    train.train_one(c, c.method, None, model=lib.TinyMLP())
