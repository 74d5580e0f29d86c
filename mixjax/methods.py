"""Method names -> objectives: the one parser of the '+'-joined method grammar.

A method name joins at most one base and any wrappers with '+':

  bases:    'erm', 'mixup' (Beta(alpha, beta)), 'untied' (U(Beta(alpha, beta))), 'dat'
  wrappers: 'amp' (`amp.amp`), 'mixupe' (`mixupe.mixupe`), applied in that order

A wrapper alone implies the 'mixup' base ('amp' == 'mixup+amp'). 'erm+mixupe'
is the MixupE paper's Table 7 row "ERM + additional loss"; 'amp' needs a
mixing base. 'mixup' with `cutmix_alpha > 0` (or `cutmix_minmax`) is timm's
mixup/CutMix switching (`policies.CutMix`); it takes no wrapper: AMP's
lambda-gradient and MixupE's first-order weight need a scalar input
coefficient, and a CutMix box is a mask. 'mixup' with `k > 2` is k-way
Dirichlet mixing (`objectives.Dirichlet`), which takes no wrapper either (its
draw has no single partner). This module sits above `objectives`, `amp` and
`mixupe`, which never import it.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

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
# Where one mixing coefficient is shared: one per batch, or `mixing.SCOPES`.
LAM_SCOPES = ("batch",) + mixing.SCOPES


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
                  beta: Optional[float] = None, lam_scope: str = "example",
                  pairing: str = "random", point: Optional[str] = None,
                  label_smoothing: float = 0.0, loss: str = "softmax_xent",
                  cosine_dim: int = 300, cosine_seed: int = 0, interpolate: bool = True,
                  amp: Optional[dict] = None, mixupe: Optional[dict] = None,
                  mesh: Optional[Mesh] = None, axis_name: mixing.AxisName = "data",
                  image_shape: Optional[Sequence[int]] = None, cutmix_alpha: float = 0.0,
                  switch_prob: float = 0.5, apply_prob: float = 1.0,
                  cutmix_minmax: Optional[Sequence[float]] = None, correct_lam: bool = True,
                  bce_threshold: Optional[float] = None, k: int = 2,
                  largest_first: bool = False) -> objectives.Objective:
  """Builds the objective of a method name such as 'mixup', 'amp', 'untied+amp+mixupe'.

  alpha, beta: the Beta(alpha, beta) of the base's policy (and, for
  'erm+mixupe', of the D_lam whose E[1 - lam] weighs MixupE's term).
  amp: kwargs of `amp.amp` (e.g. {'eps': 0.002, 'mode': 'full'}).
  mixupe: kwargs of `mixupe.mixupe` (e.g. {'eta': 1e-3}).
  lam_scope: where one coefficient is shared (`LAM_SCOPES`): 'batch' (the
  policy's `per_example=False`), 'example', 'pair' (examples i and B-1-i;
  needs pairing 'reverse': timm's mode='pair'), 'device' or 'host' (one per
  device shard or process of the batch; these need `mesh`, the batch's
  layout). Every method takes every scope; AMP then moves each example's
  coefficient by its own gradient, as it does for a per-batch draw.
  loss: 'softmax_xent', 'sigmoid_xent', 'bce' (`losses.BinaryCrossEntropy`
  with `bce_threshold`; with a threshold targets are mixed, not losses) or
  'cosine' (negative cosine against fixed random class embeddings of
  `cosine_dim` dims drawn with `cosine_seed`; the model then outputs
  f[B, cosine_dim]).

  CutMix (`policies.cutmix`), timm's `Mixup` with `mixup_alpha=alpha`: with
  `cutmix_alpha > 0` (or `cutmix_minmax` set) the 'mixup' base draws, per
  draw (per `lam_scope`), CutMix with probability
  `switch_prob` (boxes from `Beta(cutmix_alpha, cutmix_alpha)` or
  `cutmix_minmax`, `correct_lam`) and mixup with `Beta(alpha, alpha)`
  otherwise, and mixes at all with probability `apply_prob`.
  `image_shape` (H, W) or (H, W, C) of the inputs is then required;
  `switch_prob=1` is CutMix only. Wrappers ('amp', 'mixupe') and hidden
  points are refused (ValueError).
  k: 2 is pairwise mixing; k > 2 with 'mixup' is k-way mixing with weights
  `Dirichlet(alpha 1_k)` (`Dirichlet`, `largest_first` keeping the largest on
  the example itself).
  """
  base, wrappers = parse(method)
  if lam_scope not in LAM_SCOPES:
    raise ValueError(f"lam_scope must be one of {list(LAM_SCOPES)}, got {lam_scope!r}.")
  if lam_scope in ("device", "host") and mesh is None and base != "erm":
    raise ValueError(f"lam_scope={lam_scope!r} shares a coefficient within each {lam_scope} "
                     "block of the batch, so it needs the mesh the batch is sharded over "
                     "(mesh=...); without one, use 'batch' or 'example'.")
  per_example = lam_scope != "batch"
  scope = "example" if lam_scope == "batch" else lam_scope
  if loss not in LOSSES:
    raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}.")
  if bce_threshold is not None and loss != "bce":
    raise ValueError(f"bce_threshold={bce_threshold!r} needs loss='bce', got loss={loss!r}.")
  if int(k) != k or k < 2:
    raise ValueError(f"k (examples mixed per example) must be an integer >= 2, got {k!r}.")
  if k > 2 and lam_scope != "example":
    raise ValueError(f"k={k} (k-way Dirichlet mixing) draws its weights per example; "
                     f"lam_scope={lam_scope!r} applies to pairwise mixing (k=2) only.")
  if k > 2 and (base != "mixup" or wrappers or point is not None):
    raise ValueError(f"k={k} (k-way Dirichlet mixing) works with method 'mixup' at the input "
                     f"only, got method {method!r} and point={point!r}; use k=2 otherwise.")
  use_cutmix = base == "mixup" and (cutmix_alpha > 0 or cutmix_minmax is not None)
  if base in ("untied", "dat") and (cutmix_alpha > 0 or cutmix_minmax is not None):
    raise ValueError(f"cutmix_alpha={cutmix_alpha!r}, cutmix_minmax={cutmix_minmax!r}: CutMix "
                     f"switches with mixup only; use method 'mixup', got {method!r}.")
  if use_cutmix and wrappers:
    raise ValueError(f"method {method!r} with CutMix (cutmix_alpha={cutmix_alpha!r}): "
                     f"{list(wrappers)} are not defined on CutMix ('amp' needs a scalar input "
                     "coefficient to differentiate, 'mixupe' the policy's first-order weight; "
                     "a CutMix box is a hard mask). Use method 'mixup' or cutmix_alpha=0.")
  if base != "erm" and not use_cutmix and apply_prob != 1.0:
    raise ValueError(f"apply_prob={apply_prob!r} needs CutMix switching (cutmix_alpha > 0; "
                     "switch_prob=0 for mixup only with an apply probability); got method "
                     f"{method!r} with cutmix_alpha={cutmix_alpha!r}.")
  to_logits = objectives.identity
  if loss == "cosine":
    emb = losses_lib.class_embeddings(jax.random.key(cosine_seed), num_classes, cosine_dim)
    loss_fn = losses_lib.negative_cosine_loss(emb)
    to_logits = functools.partial(losses_lib.cosine_logits, embeddings=emb)
  else:
    loss_fn = losses_lib.get_loss(loss, bce_threshold) if loss == "bce" else (
        losses_lib.get_loss(loss))
  if not losses_lib.is_target_linear(loss_fn):
    interpolate = False  # The loss must see the mixed targets.

  obj: Any
  if k > 2:
    obj = objectives.Dirichlet(loss_fn, num_classes, label_smoothing, to_logits, mesh, axis_name,
                               alpha=alpha, k=int(k), largest_first=largest_first)
  elif base == "erm":
    obj = objectives.Erm(loss_fn, num_classes, label_smoothing, to_logits, mesh, axis_name)
  else:
    if use_cutmix:
      if image_shape is None or len(image_shape) not in (2, 3):
        raise ValueError(f"CutMix (cutmix_alpha={cutmix_alpha!r}) needs image_shape=(H, W) or "
                         f"(H, W, C) of the input images, got {image_shape!r}.")
      if point is not None:
        raise ValueError("CutMix mixes images at the input; point="
                         f"{point!r} (a hidden mixing point) is not supported: use point=None.")
      policy = policies.cutmix(
          cutmix_alpha if cutmix_alpha > 0 else 1.0, tuple(int(n) for n in image_shape[:2]),
          per_example, correct_lam, None if cutmix_minmax is None else tuple(cutmix_minmax),
          alpha, switch_prob, apply_prob)
    elif base == "mixup":
      policy = policies.mixup(alpha, beta, per_example)
    elif base == "untied":
      policy = policies.untied_mixup(alpha, alpha if beta is None else beta, per_example)
    else:
      policy = policies.dat(alpha, beta, per_example)
    obj = objectives.Mixup(policy, pairing_lib.get_pairing(pairing), loss_fn, num_classes, point,
                           interpolate, label_smoothing, mesh, axis_name, to_logits, scope)
  if "amp" in wrappers:
    obj = amp_lib.amp(obj, **(amp or {}))
  if "mixupe" in wrappers:
    extra = {"alpha": alpha, "beta": beta} if base == "erm" else {}
    obj = mixupe_lib.mixupe(obj, **extra, **(mixupe or {}))
  return obj
