"""SIGTERM as a request to save and stop at the next step boundary.

`train.py` installs the handler first thing, before parsing, data loading or
compiling, so a SIGTERM that arrives while a run starts is kept: the loop sees
`requested` at its first step, saves and exits cleanly.
"""

from __future__ import annotations

import signal
from typing import Any

import jax
import numpy as np


class Preemption:
  """Records SIGTERM so the train loop can save and exit at the next step boundary.

  Use as a context manager (or `install()`/`uninstall()`); the previous
  handler is restored on exit. Outside the main thread no handler can be set
  and `requested` stays False.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def install(self) -> "Preemption":
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # Not in the main thread: no signal handling.
      self._previous = None
    return self

  def _handler(self, signum, frame):
    del signum, frame
    self.requested = True

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def __enter__(self) -> "Preemption":
    return self.install()

  def __exit__(self, *exc: Any) -> None:
    self.uninstall()

  def should_stop(self, step: int, log_every_steps: int) -> bool:
    """Whether to save and stop before `step`.

    One process: at once. Several: every process agrees at each multiple of
    `log_every_steps` (the flag is all-gathered), so all of them save together.
    """
    if jax.process_count() == 1:
      return self.requested
    if step % log_every_steps:
      return False
    from jax.experimental import multihost_utils
    return bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))
