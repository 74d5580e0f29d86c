"""Method names -> objectives: the one parser of the '+'-joined method grammar.

A method name joins at most one base and any wrappers with '+':

  bases:    'erm', 'mixup' (Beta(alpha, beta)), 'untied' (U(Beta(alpha, beta))), 'dat'
  wrappers: 'amp' (`amp.amp`), 'mixupe' (`mixupe.mixupe`), applied in that order

A wrapper alone implies the 'mixup' base ('amp' == 'mixup+amp'). 'erm+mixupe'
is the MixupE paper's Table 7 row "ERM + additional loss"; 'amp' needs a
mixing base. This module sits above `objectives`, `amp` and `mixupe`, which
never import it.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
from jax.sharding import Mesh

from mixjax import amp as amp_lib
from mixjax import losses as losses_lib
from mixjax import mixing
from mixjax import mixupe as mixupe_lib
from mixjax import objectives
from mixjax import pairing as pairing_lib
from mixjax import policies

BASES = ("erm", "mixup", "untied", "dat")
WRAPPERS = ("amp", "mixupe")
MIXING_BASES = ("mixup", "untied", "dat")
LOSSES = tuple(losses_lib.LOSSES) + ("cosine",)


def parse(method: str) -> tuple[str, tuple[str, ...]]:
  """'untied+amp' -> ('untied', ('amp',)); raises ValueError naming the allowed parts."""
  if not isinstance(method, str):
    raise ValueError(f"method must be a string such as 'mixup' or 'untied+amp', got {method!r}.")
  parts = [p.strip() for p in method.split("+") if p.strip()]
  unknown = [p for p in parts if p not in BASES + WRAPPERS]
  bases = [p for p in parts if p in BASES]
  wrappers = tuple(p for p in WRAPPERS if p in parts)
  if unknown or len(bases) > 1 or not parts or len(wrappers) != len(parts) - len(bases):
    raise ValueError(f"Unknown method {method!r}: use one of {list(BASES)}, optionally joined "
                     f"with '+' to wrappers {list(WRAPPERS)} (each at most once, e.g. "
                     f"'untied+amp').")
  base = bases[0] if bases else "mixup"
  if base == "erm" and "amp" in wrappers:
    raise ValueError(f"method {method!r}: 'amp' perturbs a mixing coefficient, so it needs a "
                     f"mixing base {list(MIXING_BASES)}, not 'erm'.")
  return base, wrappers


def get_objective(method: str, *, num_classes: int, alpha: float = 1.0,
                  beta: Optional[float] = None, per_example: bool = True,
                  pairing: str = "random", point: Optional[str] = None,
                  label_smoothing: float = 0.0, loss: str = "softmax_xent",
                  cosine_dim: int = 300, cosine_seed: int = 0, interpolate: bool = True,
                  amp: Optional[dict] = None, mixupe: Optional[dict] = None,
                  mesh: Optional[Mesh] = None, axis_name: mixing.AxisName = "data"
                  ) -> objectives.Objective:
  """Builds the objective of a method name such as 'mixup', 'amp', 'untied+amp+mixupe'.

  alpha, beta: the Beta(alpha, beta) of the base's policy (and, for
  'erm+mixupe', of the D_lam whose E[1 - lam] weighs MixupE's term).
  amp: kwargs of `amp.amp` (e.g. {'eps': 0.002, 'mode': 'full'}).
  mixupe: kwargs of `mixupe.mixupe` (e.g. {'eta': 1e-3}).
  loss: 'softmax_xent', 'sigmoid_xent' or 'cosine' (negative cosine against
  fixed random class embeddings of `cosine_dim` dims drawn with `cosine_seed`;
  the model then outputs f[B, cosine_dim]).
  """
  base, wrappers = parse(method)
  if loss not in LOSSES:
    raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}.")
  to_logits = objectives.identity
  if loss == "cosine":
    emb = losses_lib.class_embeddings(jax.random.key(cosine_seed), num_classes, cosine_dim)
    loss_fn = losses_lib.negative_cosine_loss(emb)
    to_logits = functools.partial(losses_lib.cosine_logits, embeddings=emb)
  else:
    loss_fn = losses_lib.get_loss(loss)

  obj: Any
  if base == "erm":
    obj = objectives.Erm(loss_fn, num_classes, label_smoothing, to_logits, mesh, axis_name)
  else:
    if base == "mixup":
      policy = policies.mixup(alpha, beta, per_example)
    elif base == "untied":
      policy = policies.untied_mixup(alpha, alpha if beta is None else beta, per_example)
    else:
      policy = policies.dat(alpha, beta, per_example)
    obj = objectives.Mixup(policy, pairing_lib.get_pairing(pairing), loss_fn, num_classes, point,
                           interpolate, label_smoothing, mesh, axis_name, to_logits)
  if "amp" in wrappers:
    obj = amp_lib.amp(obj, **(amp or {}))
  if "mixupe" in wrappers:
    extra = {"alpha": alpha, "beta": beta} if base == "erm" else {}
    obj = mixupe_lib.mixupe(obj, **extra, **(mixupe or {}))
  return obj
