"""Argument checks that raise clear errors, eagerly or (opt-in) under `jit`.

Values known at trace time (Python numbers, concrete arrays, shapes, dtypes) are
checked at once and raise `ValueError`. Values that are traced (e.g. a mixing
coefficient computed inside a jitted function) cannot raise a Python error; they
are checked only in a function made by `checked(fn)`, through
`jax.experimental.checkify`::

    err, out = mixjax.checks.checked(fn)(...)   # or jax.jit(checked(fn)), checked(jax.jit(fn))
    err.throw()   # raises JaxRuntimeError naming the argument

Whether checks are on is part of JAX's trace-cache key (`jax.make_user_context`),
so `fn`, and every function jitted inside it, is traced once with checks (under
`checked`) and once without (elsewhere), whatever the order of the calls.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

_TRACED = jax.make_user_context(default_value=False)  # In the jit cache key.


def checked(fn: Callable[..., Any],
            errors: frozenset = checkify.user_checks) -> Callable[..., tuple[Any, Any]]:
  """`fn` with its checks on traced values: returns `(error, fn(*args, **kwargs))`.

  `error.throw()` raises `JaxRuntimeError` with the failed check's message
  (None from `error.get()` when all hold). `fn` may be jitted or contain
  jitted functions, and the result may be jitted again (`jax.jit(checked(fn))`):
  while the returned function runs or is traced, a flag that is part of
  JAX's trace-cache key is set, so nothing traced without checks is reused
  here and nothing traced here is reused by a plain call of `fn`. `errors`:
  which checkify errors to add (default: the user checks of this module).
  """
  inner = checkify.checkify(fn, errors=errors)

  @functools.wraps(fn)
  def run(*args, **kwargs):
    with _TRACED(True):
      return inner(*args, **kwargs)
  return run


def is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def check_array(x: Any, predicate: Callable[[Any], Any], message: str) -> None:
  """Raises `ValueError(message)` unless `predicate(x)` holds for every element.

  `predicate` must work on NumPy and jax arrays alike. For traced `x` the check
  is a `checkify.check` inside a function made by `checked`, and nothing otherwise.
  """
  if is_traced(x):
    if _TRACED.value:
      checkify.check(jnp.all(predicate(x)), message)
    return
  if not np.all(predicate(np.asarray(x))):
    raise ValueError(message)


def positive_number(name: str, value: Any, hint: str = "") -> float:
  """Returns `value` as a float, or raises if it is not a finite number > 0."""
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number > 0, got {value!r}.{hint}") from None
  if not math.isfinite(v) or v <= 0:
    raise ValueError(f"{name} must be a finite number > 0, got {value!r}.{hint}")
  return v


def in_unit_interval(name: str, x: Any) -> None:
  """Checks that every element of `x` lies in [0, 1] and is not NaN."""
  check_array(
      x,
      lambda v: (v >= 0) & (v <= 1),
      f"{name} must lie in [0, 1] (and not be NaN).",
  )


def float_leaves(name: str, tree: Any) -> None:
  """Raises if a leaf of `tree` is not floating point (e.g. uint8 images)."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      where = jax.tree_util.keystr(path) or "(the array)"
      raise ValueError(
          f"{name}{where if where != '(the array)' else ''} has dtype {dtype}; "
          "mixing needs floating-point values. Convert first, e.g. "
          "`x.astype(jnp.float32) / 255.0` for uint8 images."
      )


def batch_size(name: str, tree: Any) -> int:
  """The common leading dimension of all leaves of `tree`."""
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    raise ValueError(f"{name} is empty: expected arrays with a leading batch axis.")
  sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
  if None in sizes:
    raise ValueError(f"{name} has a scalar leaf; every leaf needs a leading batch axis.")
  if len(sizes) != 1:
    raise ValueError(f"{name} leaves have different batch sizes {sorted(sizes)}; they must agree.")
  return sizes.pop()


def prng_key(name: str, key: Any) -> None:
  """ValueError unless `key` is a JAX PRNG key (`jax.random.key(seed)`, or raw uint32[2])."""
  dtype = getattr(key, "dtype", None)
  if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
    return
  if dtype == jnp.uint32 and np.shape(key)[-1:] == (2,):
    return
  shown = repr(key) if len(repr(key)) < 120 else repr(key)[:117] + "..."
  raise ValueError(f"{name} must be a PRNG key such as jax.random.key(0), got {shown}.")
