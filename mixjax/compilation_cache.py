"""JAX's persistent compilation cache, on by default for `train.py`.

Compiled programs are kept in $MIXJAX_CACHE_DIR (else
$JAX_COMPILATION_CACHE_DIR, else ~/.cache/mixjax/jax), so a second run of the
same config loads its train step from disk instead of compiling it.
"""

from __future__ import annotations

import os
from typing import Optional

import jax

CACHE_ENV = "MIXJAX_CACHE_DIR"
NO_CACHE_ENV = "MIXJAX_NO_COMPILATION_CACHE"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "mixjax", "jax")


def use(disable: bool = False) -> Optional[str]:
  """Turns on JAX's persistent compilation cache; returns its folder (None when off).

  The folder is $MIXJAX_CACHE_DIR, else $JAX_COMPILATION_CACHE_DIR, else
  ~/.cache/mixjax/jax. Programs that took over 0.1 s to compile are kept, so a
  second run of the same config (CPU ones included) loads its train step from
  disk. Off with `disable` (--no_compilation_cache) or
  MIXJAX_NO_COMPILATION_CACHE=1.
  """
  if disable or os.environ.get(NO_CACHE_ENV, "0") not in ("", "0"):
    return None
  path = os.path.expanduser(os.environ.get(CACHE_ENV) or
                            os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_CACHE_DIR)
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
  return path
