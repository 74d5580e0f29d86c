"""Fault injection: damaged, foreign and non-finite checkpoints, crafted logs, bad configs.

One tiny run (TinyResNet, 8 steps, checkpoints at 4 and 8) is shared; each case
damages a copy of its workdir. Every case ends in a bit-identical restore of
the last good checkpoint or a clear error with nothing lost (docs/reliability.md).
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
import signal
import subprocess
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
import train_testlib as lib
from mixjax import checkpointing
from mixjax import config_utils
from mixjax import metrics_writer as mw

STEPS = 8


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  with lib.compilation_cache(str(tmp_path_factory.mktemp("jax_cache"))) as path:
    yield path


def _config():
  c = lib.tiny_config(STEPS)
  c.checkpoint_every_steps = 4
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(workdir, result, {step: host copy of the saved state}) of one 8-step run."""
  w = str(tmp_path_factory.mktemp("trained"))
  c = _config()
  res = train.train_one(c, c.method, w, model=lib.TinyResNet())
  ck = checkpointing.Checkpointer(os.path.join(w, "checkpoints"))
  assert ck.steps() == [4, 8]
  saved = {s: jax.device_get(ck.restore(s, res["state"])[0]) for s in ck.steps()}
  ck.close()
  return w, res, saved


def _copy(trained, tmp_path) -> str:
  w = str(tmp_path / "w")
  shutil.copytree(trained[0], w)
  return w


def _same(a, b) -> bool:
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _array_files(w: str, step: int) -> list[str]:
  return sorted(glob.glob(os.path.join(w, "checkpoints", str(step), "state", "**", "d", "*"),
                          recursive=True))


def _flip(path: str, offset: int, mask: int = 0x10) -> None:
  with open(path, "r+b") as f:
    f.seek(offset)
    b = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([b ^ mask]))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax internals
def test_bit_flips_in_every_array_file_restore_exactly_or_fall_back(trained, tmp_path, capfd):
  _, res, saved = trained
  files = _array_files(trained[0], 8)
  assert files
  caught = 0
  for i, name in enumerate(files):
    size = os.path.getsize(name)
    for j, offset in enumerate((size // 7, size // 2, size - 9)):
      w = str(tmp_path / f"w{i}_{j}")
      shutil.copytree(os.path.join(trained[0], "checkpoints"), os.path.join(w, "checkpoints"))
      _flip(name.replace(trained[0], w), offset)
      ck = checkpointing.Checkpointer(os.path.join(w, "checkpoints"))
      state, meta = ck.restore_latest(res["state"])
      ck.close()
      # Either the flip hit bytes no array is read from, or step 8 was set aside.
      assert _same(jax.device_get(state), saved[meta["step"]]), (name, offset)
      if meta["step"] == 4:
        caught += 1
        assert [d.split("-")[0] for d in os.listdir(os.path.join(w, "checkpoints_corrupt"))] == ["8"]
  err = capfd.readouterr().err
  assert caught >= 3 and "fails its checksum" in err, err[-2000:]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_truncated_or_garbage_checkpoint_resumes_bit_identically(trained, tmp_path, capfd):
  ref_dir, ref, _ = trained
  w = _copy(trained, tmp_path)
  for name in _array_files(w, 8):  # 8 bytes of finite garbage in every array file
    size = os.path.getsize(name)
    with open(name, "r+b") as f:
      f.seek(size // 2)
      f.write(np.float64(1.5).tobytes())
  c = _config()
  rest = train.train_one(c, c.method, w, model=lib.TinyResNet())
  assert "resumed from step 4" in capfd.readouterr().out
  assert rest["step"] == STEPS and lib.train_losses(w) == lib.train_losses(ref_dir)
  assert _same(jax.device_get(rest["state"]), jax.device_get(ref["state"]))
  w2 = str(tmp_path / "w2")
  shutil.copytree(ref_dir, w2)
  for name in _array_files(w2, 8):
    with open(name, "r+b") as f:
      f.truncate(os.path.getsize(name) // 2)
  ck = checkpointing.Checkpointer(os.path.join(w2, "checkpoints"))
  state, meta = ck.restore_latest(ref["state"])
  ck.close()
  assert meta["step"] == 4 and _same(jax.device_get(state), trained[2][4])


def test_checkpoint_of_another_model_raises_naming_the_leaf(trained, tmp_path):
  w = _copy(trained, tmp_path)
  c = _config()
  with pytest.raises(checkpointing.IncompatibleCheckpointError,
                     match=r"leaf \.params\['BatchNorm_0'\]\['bias'\] has shape \(8,\) float32 "
                     r"in the checkpoint but \(4,\) float32"):
    train.train_one(c, c.method, w, model=lib.TinyResNet(width=4))
  assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["4", "8"]  # nothing moved
  assert not os.path.exists(os.path.join(w, "checkpoints_corrupt"))


def test_resume_with_changed_config_needs_the_flag(trained, tmp_path):
  w = _copy(trained, tmp_path)
  c = _config()
  c.seed, c.mix.alpha = 1, 0.4
  with pytest.raises(ValueError, match=r"another config: mix\.alpha: 1\.0 -> 0\.4; seed: 0 -> 1"
                     r".*--allow_config_change"):
    train.train_one(c, c.method, w, model=lib.TinyResNet())
  assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["4", "8"]
  res = train.train_one(c, c.method, w, model=lib.TinyResNet(), allow_config_change=True)
  assert res["step"] == STEPS and _same(jax.device_get(res["state"]),
                                        jax.device_get(trained[1]["state"]))


def test_nan_is_never_saved(tmp_path):
  ck = checkpointing.Checkpointer(str(tmp_path / "ck"), async_save=False)
  good = {"w": jnp.ones(3), "opt": {"mu": jnp.zeros(2)}, "n": jnp.int32(1)}
  ck.save(1, good, {"step": 1})
  bad = {"w": jnp.ones(3), "opt": {"mu": jnp.array([0.0, jnp.inf])}, "n": jnp.int32(2)}
  with pytest.raises(checkpointing.NonFiniteStateError,
                     match=r"step 2: .*\['opt'\]\['mu'\].*nothing was written.*step 1, is intact"):
    ck.save(2, bad, {"step": 2})
  assert ck.steps() == [1] and sorted(os.listdir(tmp_path / "ck")) == ["1"]
  ck.close()
  # An overflowing update (lr 1e39 is inf in f32): skipped, and every checkpoint is finite.
  c = lib.tiny_config(steps=4)
  c.optimizer.lr, c.optimizer.weight_decay, c.nan_policy = 1e39, 0.0, "skip"
  c.checkpoint_every_steps = 2
  res = train.train_one(c, "erm", str(tmp_path / "w"), model=lib.TinyMLP())
  assert res["skipped_steps"]
  ck = checkpointing.Checkpointer(str(tmp_path / "w" / "checkpoints"))
  assert ck.steps() == [2, 4]
  for s in ck.steps():
    state, _ = ck.restore(s, res["state"])
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(
        jax.device_get((state.params, state.opt_state, state.ema_params))))
  ck.close()


def test_crafted_metrics_kinds_name_no_path_outside_the_workdir(tmp_path, capfd):
  w = tmp_path / "w"
  w.mkdir()
  victim = tmp_path / "victim.csv"
  victim.write_text("keep me\n")
  lines = ['{"step": 1, "kind": "train", "loss": 1.0}', '{"step": 1, "kind": "../victim"}',
           '{"step": 1, "kind": "/tmp/x"}', '{"step": 1, "kind": "Train"}', '[1, 2]', '7',
           '{"step": "1", "kind": "eval"}', '{"step": 1, "kind": ["train"]}']
  (w / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  writer = mw.MetricsWriter(str(w), tensorboard=False)
  writer.truncate(5)
  assert victim.read_text() == "keep me\n"
  assert sorted(os.listdir(w)) == ["metrics.jsonl", "train.csv"]
  assert [r["kind"] for r in mw.read_jsonl(str(w / "metrics.jsonl"))] == ["train"]
  assert "dropping 7 malformed records" in capfd.readouterr().err
  with pytest.raises(ValueError, match=r"metrics kind '\.\./x' must match"):
    writer.write(2, "../x", {"loss": 1.0})
  writer.close()


@pytest.mark.parametrize("key,value,match", [
    ("checkpoint_every_steps", 0, r"config\.checkpoint_every_steps must be > 0"),
    ("eval_batch_size", -4, r"config\.eval_batch_size must be >= 0, got -4"),
    ("eval_every_steps", -1, r"config\.eval_every_steps must be >= 0"),
    ("batch_size", True, r"config\.batch_size must be an integer, got True \(bool\)"),
    ("seed", -1, r"config\.seed must be >= 0"),
])
def test_bad_config_values_fail_validation(key, value, match):
  c = lib.tiny_config()
  c[key] = value
  with pytest.raises(ValueError, match=match):
    config_utils.validate(c)


def test_batch_and_labels_checked_before_compiling(tmp_path):
  c = lib.tiny_config()
  c.batch_size, c.mesh_data = 12, 8
  with pytest.raises(ValueError, match=r"config\.batch_size=12 is split over 8 devices"):
    train.train_one(c, c.method, None, model=lib.TinyMLP())
  c = lib.tiny_config()
  c.dataset.name, c.dataset.input_shape, c.dataset.augment = "digits", (8, 8, 1), "none"
  c.dataset.num_classes = 5
  with pytest.raises(ValueError, match=r"config\.dataset\.num_classes=5 .* span \[0, 9\]"):
    train.train_one(c, c.method, None, model=lib.TinyMLP(num_classes=5))


def _make_unwritable(path) -> Optional[Callable[[], Any]]:
  """Makes the folder `path` refuse new files, for root too where possible; returns the undo.

  Non-root: permissions (0o555). Root ignores those: the immutable flag (`chattr +i`),
  where the file system supports it. None when neither works.
  """
  if os.geteuid() != 0:
    os.chmod(path, 0o555)
    return lambda: os.chmod(path, 0o755)
  try:
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
  except OSError:  # No chattr.
    done = False
  return (lambda: subprocess.run(["chattr", "-i", str(path)], check=True)) if done else None


def test_unwritable_checkpoint_folder_fails_at_start(tmp_path, monkeypatch):
  (tmp_path / "file").write_text("")
  with pytest.raises(checkpointing.CheckpointError, match="not writable"):
    checkpointing.Checkpointer(str(tmp_path / "file" / "checkpoints"))
  # A real unwritable folder (as root: immutable), where this machine can make one.
  ro = tmp_path / "ro"
  ro.mkdir()
  undo = _make_unwritable(ro)
  if undo is not None:
    try:
      with pytest.raises(checkpointing.CheckpointError, match="not writable"):
        checkpointing.Checkpointer(str(ro / "checkpoints"))
      assert not os.path.exists(ro / "checkpoints")
    finally:
      undo()
  # Everywhere, root or not: the check's one file creation (`os.open`) is refused.
  target, probes, real_open = tmp_path / "denied", [], os.open

  def denied(path, flags, *args, **kwargs):
    if os.path.dirname(os.fspath(path)) == str(target):
      probes.append(os.path.basename(os.fspath(path)))
      raise PermissionError(errno.EACCES, "Permission denied", path)
    return real_open(path, flags, *args, **kwargs)

  monkeypatch.setattr(os, "open", denied)
  with pytest.raises(checkpointing.CheckpointError, match=r"denied is not writable \(Permission"):
    checkpointing.Checkpointer(str(target))
  monkeypatch.undo()
  assert len(probes) == 1 and probes[0].startswith(".mixjax_write_test_")  # The path it takes.
  assert os.listdir(target) == []
  checkpointing.Checkpointer(str(target)).close()  # Unpatched, the same folder passes.
  assert os.listdir(target) == []  # The probe file is removed.


def test_symlinked_step_folder_is_refused_at_start(trained, tmp_path):
  """orbax's clean-up would rmtree the link (OSError mid-run): refused before anything runs."""
  w = _copy(trained, tmp_path)
  d = os.path.join(w, "checkpoints")
  target, link = str(tmp_path / "elsewhere"), os.path.join(d, "4")
  shutil.move(link, target)
  os.symlink(target, link)
  before = sorted(os.listdir(d))
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"symlinked step folders \(4 -> .*elsewhere\).*cp -rL"):
    train.train_one(_config(), "mixup", w, model=lib.TinyResNet())
  assert sorted(os.listdir(d)) == before and os.path.isdir(target) and os.path.islink(link)
  os.remove(link)  # Following the advice: a copy instead of the link.
  shutil.copytree(target, link)
  ck = checkpointing.Checkpointer(d, keep=1)
  ck.save(9, trained[1]["state"], {"step": 9})
  ck.close()  # The clean-up of steps 4 and 8 runs without error.
  assert ck.steps() == [9] and sorted(os.listdir(d)) == ["9"]


def test_async_writes_are_bounded_and_logged(tmp_path, monkeypatch):
  ck = checkpointing.Checkpointer(str(tmp_path / "ck"), keep=5)
  state = {"w": jnp.arange(4.0)}
  first = ck.save(1, state, {"step": 1})
  assert first[:4] == (1, None, None, None)
  assert checkpointing.describe(first).endswith("last completed write: none yet")
  # The write of step 1 still in flight when step 3 is saved: it is waited for first.
  calls, manager = [], ck.manager
  real_wait, real_save = manager.wait_until_finished, manager.save
  monkeypatch.setattr(manager, "is_saving_in_progress", lambda: True)
  monkeypatch.setattr(manager, "wait_until_finished", lambda: (calls.append("wait"), real_wait()))
  monkeypatch.setattr(manager, "save", lambda *a, **k: (calls.append("save"), real_save(*a, **k)))
  info = ck.save(3, state, {"step": 3})
  assert calls[:2] == ["wait", "save"]  # Never two writes in flight.
  assert info[:4] == (3, 1, 2, 1) and info.waited_s >= 0
  assert checkpointing.describe(info) == (
      f"checkpoint step 3: writing in the background; last completed write: step 1 (2 steps "
      f"behind); waited {info.waited_s:.1f} s for the write of step 1 first")
  monkeypatch.undo()
  ck.close()
  assert ck.steps() == [1, 3]
  again = checkpointing.Checkpointer(str(tmp_path / "ck"))  # Resumed: the newest on disk.
  assert again.last_completed == 3
  again.close()


def test_sigterm_while_starting_is_kept(tmp_path, monkeypatch, capsys):
  """A SIGTERM while the data loads (train_one) or the flags parse (main) is kept: save, exit."""
  lost = []

  def record(signum, frame):
    lost.append(signum)

  previous = signal.signal(signal.SIGTERM, record)  # Where a SIGTERM would go if not caught.
  try:
    def sigterm_then(fn):
      def wrapped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return fn(*args, **kwargs)
      return wrapped

    monkeypatch.setattr(train.from_config, "data", sigterm_then(train.from_config.data))
    c = _config()
    res = train.train_one(c, c.method, str(tmp_path / "one"), model=lib.TinyMLP())
    monkeypatch.undo()
    assert lost == [] and res["preempted"] and res["step"] == 0
    assert signal.getsignal(signal.SIGTERM) is record  # The previous handler is back.
    ck = checkpointing.Checkpointer(str(tmp_path / "one" / "checkpoints"))
    assert ck.steps() == [0]
    ck.close()
    out = capsys.readouterr().out
    assert "checkpoint step 0: writing in the background" in out and "SIGTERM: saved step 0" in out

    # main: the handler is there before the flags parse, and is the one the run obeys.
    seen = []
    monkeypatch.setattr(train.cli, "parse_args", sigterm_then(train.cli.parse_args))
    monkeypatch.setattr(train, "train_and_evaluate",
                        lambda *a, preempt, **k: seen.append(preempt.requested) or [])
    code = train.main(["--config", os.path.join(lib.ROOT, "configs", "uci_mlp.py"),
                       "--no_compilation_cache"])
    assert code == 0 and lost == [] and seen == [True]
    assert signal.getsignal(signal.SIGTERM) is record
  finally:
    signal.signal(signal.SIGTERM, previous)
