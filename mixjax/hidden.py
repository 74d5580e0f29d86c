"""Mixing at hidden layers of unmodified Flax models ("manifold mixup").

Linen models: `mix_at` intercepts the output of the submodule at a path with
`flax.linen.intercept_methods`. NNX models: `nnx_mix_at` swaps the submodule for
a wrapper for the duration of the block. Neither needs the model's code changed::

  with mix_at("layer2", lam, perm):
    logits = model.apply(variables, x)
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
