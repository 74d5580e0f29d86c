"""Multi-host preemption: a SIGTERM on one process stops every process at the same step.

`Preemption.should_stop` all-gathers the flag at each multiple of
`log_every_steps`; two local processes (jax.distributed, one CPU device each)
train a tiny MLP, only process 1 is sent SIGTERM (after step 5), and both must
save step 8 (the next multiple of 4) together, exit cleanly and leave a
checkpoint that resumes to the losses of an uninterrupted run.
"""

from __future__ import annotations

import os

import pytest

import train
import train_testlib as lib

STEPS, LOG_EVERY, SIGTERM_AT = 12, 4, 5
STOP = -(-SIGTERM_AT // LOG_EVERY) * LOG_EVERY  # The first agreement step after the signal: 8.


def _config():
  c = lib.tiny_config(STEPS)
  c.mesh_data = 2
  c.checkpoint_every_steps = 100  # Only the preemption saves before the end.
  c.log_every_steps = LOG_EVERY
  return c


def test_sigterm_on_one_process_stops_both_at_the_same_step(tmp_path, capsys):
  w, port = str(tmp_path / "w"), lib.free_port()
  args = [w, STEPS, "--model", "mlp", "--mesh_data", 2, "--ckpt_every", 100,
          "--log_every", LOG_EVERY, "--distributed", f"127.0.0.1:{port}", 2]
  procs = [lib.spawn(args + [0], env_devices=1),
           lib.spawn(args + [1, "--sigterm_at", SIGTERM_AT], env_devices=1)]
  outs = lib.communicate(procs, timeout=120)
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
    assert f"DONE {STOP} preempted" in out, out
  assert f"SIGTERM: saved step {STOP}" in outs[0], outs[0]
  ckdir = os.path.join(w, "checkpoints")
  assert sorted(int(s) for s in os.listdir(ckdir) if s.isdigit()) == [STOP]
  assert max(lib.train_losses(w)) == STOP

  c = _config()
  capsys.readouterr()
  rest = train.train_one(c, c.method, w, model=lib.TinyMLP())
  assert f"resumed from step {STOP}" in capsys.readouterr().out
  assert rest["step"] == STEPS and not rest["preempted"]
  # Stopped, saved and resumed == uninterrupted (one process, the same 2-device mesh).
  ref = str(tmp_path / "ref")
  train.train_one(c, c.method, ref, model=lib.TinyMLP())
  losses = lib.train_losses(w)
  assert sorted(losses) == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
  assert losses == pytest.approx(lib.train_losses(ref), rel=1e-5)
