"""Mixing at hidden layers of unmodified Flax models ("manifold mixup").

Linen models: `mix_at` intercepts the output of the submodule at a path with
`flax.linen.intercept_methods`. NNX models: `nnx_mix_at` swaps the submodule for
a wrapper for the duration of the block. Neither needs the model's code changed::

  with mix_at("layer2", lam, perm):
    logits = model.apply(variables, x)

`capture_below` and `inject_at` split a linen pass at a submodule: one pass
records what the layers below it compute, later passes start at it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence, Union

import flax.linen as nn
import jax
from jax.sharding import Mesh

from mixjax import mixing

Path = Union[str, Sequence[str]]


def normalize_path(path: Path) -> tuple[str, ...]:
  """'stage1/block0' or ('stage1', 'block0') -> ('stage1', 'block0')."""
  if isinstance(path, str):
    parts = tuple(p for p in path.split("/") if p)
  else:
    parts = tuple(str(p) for p in path)
  if not parts:
    raise ValueError("path must name a submodule, e.g. 'layer2' or 'stage1/block0'.")
  return parts


@contextlib.contextmanager
def mix_at(path: Path, lam: Any, perm: jax.Array, *, mesh: Optional[Mesh] = None,
           axis_name: mixing.AxisName = "data") -> Iterator[None]:
  """Within the block, the linen submodule at `path` outputs its mixed output.

  The output `h` (f[B, ...] or a pytree) of every `__call__` of the submodule
  is replaced by `lam * h + (1 - lam) * h[perm]`. Raises `ValueError` on exit
  if no submodule at `path` was called, listing the paths that were.
  """
  target = normalize_path(path)
  seen: list[str] = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name != "__call__":
      return out
    here = tuple(context.module.path)
    if here == target:
      seen.append("hit")
      return mixing.mix_with_partner(out, perm, lam, mesh=mesh, axis_name=axis_name)
    seen.append("/".join(here))
    return out

  with nn.intercept_methods(interceptor):
    yield
  if "hit" not in seen:
    called = sorted({s for s in seen if s})
    raise ValueError(f"No submodule at path {'/'.join(target)!r} was called; "
                     f"mixing points of this model: {called}.")


def _role(here: tuple[str, ...], method: str, target: tuple[str, ...]) -> str:
  """A call's role before the point ran: 'run' (an ancestor's or `setup`), 'point' or 'below'."""
  if method == "setup" or (len(here) < len(target) and target[:len(here)] == here):
    return "run"
  return "point" if here == target and method == "__call__" else "below"


class Capture:
  """What a linen pass computes below the submodule at a path (`capture_below`).

  h: the submodule's output (its one `__call__`), None if it was not reached.
  below: outputs of the calls made before it by modules that are not its
    ancestors (top-level ones: not those nested in another recorded call), in order.
  variables: `(module path, the module's variables right after its call)` for
    those calls and the point's, in order.
  calls: how many times the submodule's `__call__` ran.
  """

  def __init__(self):
    self.h: Any = None
    self.below: list[Any] = []
    self.variables: list[tuple[tuple[str, ...], Any]] = []
    self.calls = 0


@contextlib.contextmanager
def capture_below(path: Path) -> Iterator[Capture]:
  """Within the block, records what a linen pass computes below the submodule at `path`.

  The pass runs unchanged. Yields a `Capture`, filled as the pass runs. With
  `inject_at` it lets a second pass start at `path`: the layers below it do
  not run again.
  """
  target = normalize_path(path)
  cap = Capture()
  depth, done = [0], [False]

  def interceptor(next_fun, args, kwargs, context):
    role = _role(tuple(context.module.path), context.method_name, target)
    cap.calls += role == "point"
    if done[0] or depth[0] or role == "run":
      return next_fun(*args, **kwargs)
    depth[0] += 1
    try:
      out = next_fun(*args, **kwargs)
    finally:
      depth[0] -= 1
    if role == "point":
      cap.h, done[0] = out, True
    else:
      cap.below.append(out)
    cap.variables.append((tuple(context.module.path), context.module.variables))
    return out

  with nn.intercept_methods(interceptor):
    yield cap


@contextlib.contextmanager
def inject_at(path: Path, h: Any, below: Sequence[Any]) -> Iterator[None]:
  """Within the block, a linen pass starts at the submodule at `path`: it outputs `h`.

  The submodule does not run, and the calls before it by modules that are
  not its ancestors return `below` (in order, from `capture_below`) without
  running, so the layers below `path` compute nothing (what the ancestors
  compute between those calls runs; XLA removes it where unused). Raises
  `ValueError` on exit if the pass's calls do not match the capture's.
  """
  target = normalize_path(path)
  replayed = [0]
  hit = [False]

  def interceptor(next_fun, args, kwargs, context):
    role = _role(tuple(context.module.path), context.method_name, target)
    if hit[0] or role == "run":
      return next_fun(*args, **kwargs)
    if role == "point":
      hit[0] = True
      return h
    if replayed[0] >= len(below):
      raise ValueError(f"the pass made more calls below {'/'.join(target)!r} than the "
                       f"{len(below)} captured.")
    replayed[0] += 1
    return below[replayed[0] - 1]

  with nn.intercept_methods(interceptor):
    yield
  if not hit[0] or replayed[0] != len(below):
    raise ValueError(f"the pass made {replayed[0]} calls below {'/'.join(target)!r} (the capture "
                     f"{len(below)}) and {'reached' if hit[0] else 'did not reach'} it.")


def module_paths(module: nn.Module, variables: Any, *args, **kwargs) -> list[str]:
  """Paths of all submodules called by `module.apply(variables, *args, **kwargs)`.

  In the order their calls start (so stage outputs come in network order).
  Runs under `jax.eval_shape`: no FLOPs are spent.
  """
  paths: list[str] = []

  def interceptor(next_fun, a, kw, context):
    if context.method_name == "__call__":
      p = "/".join(context.module.path)
      if p and p not in paths:
        paths.append(p)
    return next_fun(*a, **kw)

  def run(v, *a):
    with nn.intercept_methods(interceptor):
      return module.apply(v, *a, mutable=True, **kwargs)

  jax.eval_shape(run, variables, *args)
  return paths


class _Mixed:
  """Calls the wrapped NNX module and mixes its output."""

  def __init__(self, inner, lam, perm, mesh, axis_name):
    self.inner, self.lam, self.perm, self.mesh, self.axis_name = inner, lam, perm, mesh, axis_name

  def __call__(self, *args, **kwargs):
    out = self.inner(*args, **kwargs)
    return mixing.mix_with_partner(out, self.perm, self.lam, mesh=self.mesh,
                                   axis_name=self.axis_name)


def child(parent: Any, name: str) -> Any:
  """The submodule (attribute, or list index for digits) `name` of an NNX module."""
  if name.isdigit() and not hasattr(parent, name):
    return parent[int(name)]
  if not hasattr(parent, name):
    raise ValueError(f"{type(parent).__name__} has no submodule {name!r}.")
  return getattr(parent, name)


def set_child(parent: Any, name: str, value: Any) -> None:
  """Sets the submodule `name` of an NNX module (bypassing NNX's attribute checks)."""
  if name.isdigit() and not hasattr(parent, name):
    parent[int(name)] = value
  else:
    object.__setattr__(parent, name, value)


@contextlib.contextmanager
def nnx_mix_at(model: Any, path: Path, lam: Any, perm: jax.Array, *,
               mesh: Optional[Mesh] = None, axis_name: mixing.AxisName = "data") -> Iterator[None]:
  """Within the block, the `flax.nnx` submodule at `path` outputs its mixed output.

  `path` names attributes (and list indices) from `model`, e.g. 'blocks/2'.
  The model is restored on exit, also on error.
  """
  parts = normalize_path(path)
  parent = model
  for name in parts[:-1]:
    parent = child(parent, name)
  inner = child(parent, parts[-1])
  set_child(parent, parts[-1], _Mixed(inner, lam, perm, mesh, axis_name))
  try:
    yield
  finally:
    set_child(parent, parts[-1], inner)
