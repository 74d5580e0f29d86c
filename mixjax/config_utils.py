"""Training configs: loading `configs/<recipe>.py[:arg]`, overrides and validation.

A config file defines `get_config(arg=None) -> ConfigDict` (big_vision style).
The text after ':' in `configs/x.py:res=64,runlocal` is handed to
`get_config`; `parse_arg(arg, res=224, runlocal=False)` turns it into typed
values. Every recipe starts from `base_config()`, the full schema: after
loading, `--config.a.b=value` overrides may change existing fields only (new
keys are allowed only under `model.kwargs`, the model's own arguments, which
the model constructor checks), and `validate` checks values, so a mistyped
key or value fails before anything is compiled. Allowed methods, pairings,
losses, AMP modes and MixupE options come from the library's registries
(`methods.parse`, `pairing.get_pairing`, `methods.LOSSES`, `amp.MODES`,
`mixupe.CLEAN_PASSES`, `mixupe.BATCH_STATS`).

The overrides are parsed here rather than by `ml_collections.config_flags`,
which cannot override a field whose default is None (`mix.beta`,
`mix.point`, `dataset.data_dir`), and can add new keys either everywhere or
nowhere (here: only under `model.kwargs`).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
from typing import Any, Optional, Sequence

import ml_collections

from mixjax import amp as amp_lib
from mixjax import methods as methods_lib
from mixjax import mixupe as mixupe_lib
from mixjax import pairing as pairing_lib

ConfigDict = ml_collections.ConfigDict

# Values of the fields whose choices live in no registry of the library.
DATASETS = ("digits", "iris", "synthetic", "npz", "tsv", "tfds")
AUGMENTS = ("none", "cifar", "inception", "flip")
OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULES = ("warmup_cosine", "piecewise", "constant")
FREE_FORM = ("model.kwargs",)


def base_config() -> ConfigDict:
  """The full schema with defaults; recipes change values, never add keys."""
  c = ConfigDict()
  c.seed = 0
  # '+'-joined objective ('mixup', 'untied+amp', 'mixup+amp+mixupe', ...); a
  # ','-separated list trains each method in turn (workdir/<method>).
  c.method = "mixup"
  c.mix = ConfigDict(dict(
      alpha=1.0,
      beta=None,           # None: beta = alpha.
      lam_scope="example",  # one lam per example, pair (i, B-1-i), device, host or batch.
      pairing="random",    # within-batch pairing: random, reverse, roll, same_class.
      shard_local=True,    # pair inside each device's shard (no cross-device traffic).
      point=None,          # None mixes inputs; a submodule path mixes its output.
      interpolate=True,    # interpolate losses (True) or mix targets (False).
      label_smoothing=0.0,
      loss="softmax_xent",  # softmax_xent, sigmoid_xent, cosine.
      cosine_dim=300,
      erm_warmup_steps=0,  # train with ERM for this many steps first.
      # CutMix as timm's Mixup (method 'mixup'): > 0 draws boxes from Beta(cutmix_alpha, ...).
      cutmix_alpha=0.0,
      switch_prob=0.5,     # P(CutMix) per draw, else mixup with Beta(alpha, alpha).
      apply_prob=1.0,      # P(mix at all) per draw (needs cutmix_alpha > 0).
      cutmix_minmax=None,  # (lo, hi): box sides uniform in [lo, hi) of the image instead.
      correct_lam=True,    # label weight = kept area of the clipped box.
      bce_threshold=None,  # loss 'bce': mixed targets > threshold become 1.
      k=2,                 # examples per mix; k > 2 with 'mixup': Dirichlet(alpha) weights.
      k_largest_first=False,  # k-way: the example itself gets the largest weight.
  ))
  c.amp = ConfigDict(dict(
      eps=0.002,
      mode="full",         # full, max, rand.
      variant="paper",     # paper, or released (the authors' code: see mixjax.amp).
      window=5,            # released: steps in the moving window of loss increases.
  ))
  c.mixupe = ConfigDict(dict(
      eta=1e-3,
      exact=False,         # exact q (JVP along E[x'] - x) instead of the approximation q^.
      mean="running",      # E[x'] for exact q: 'running' (mean of training inputs) or 'batch'.
      clean_pass="concat",  # clean batch concatenated with the mixed one, or 'separate'.
      batch_stats="mixed",  # concat: batch-norm statistics of the mixed rows, or 'all'.
      rho=1.0,             # fraction of the clean batch that estimates R.
      variant="paper",     # paper, or released (the authors' version 3: see mixjax.mixupe).
      threshold=1.0,       # released: q^ below this enters the signed term.
  ))
  c.model = ConfigDict(dict(
      name="digits_cnn",
      dtype="float32",     # compute dtype ('bfloat16': bf16 compute, f32 master weights).
      kwargs=ConfigDict(),  # model-specific constructor arguments.
  ))
  c.dataset = ConfigDict(dict(
      name="digits",       # digits, iris, synthetic, npz, tsv, tfds.
      tfds_name="",        # for name='tfds': e.g. 'imagenet2012', 'cifar10'.
      data_dir=None,       # TFDS data_dir, or the folder of npz/tsv files.
      train_split="train",
      eval_split="test",
      num_classes=10,
      input_shape=(8, 8, 1),  # one training example after augmentation.
      input_dtype="float32",  # 'int32' for token ids.
      train_examples=0,    # 0: from the data; used for synthetic data and epoch maths.
      eval_examples=0,
      augment="none",      # none, flip, cifar (pad-crop-flip), inception (crop+flip).
      normalize="none",    # none, imagenet, cifar10, cifar100, svhn, per_dataset.
      label_corruption=0.0,  # fraction of training labels replaced by random ones.
      corruption_seed=0,
      epoch_pairing=False,  # pair two independently shuffled copies (Untied MixUp).
      vocab_size=20000,    # text: vocabulary (0 pad, 1 unknown).
      prefetch=2,
  ))
  c.batch_size = 128       # global batch size.
  c.eval_batch_size = 0    # 0: batch_size.
  c.total_steps = 0        # 0: num_epochs * steps per epoch.
  c.num_epochs = 0.0
  c.optimizer = ConfigDict(dict(
      name="sgd",
      lr=0.1,              # peak learning rate.
      momentum=0.9,
      nesterov=False,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,    # L2 for sgd (added to gradients), decoupled for adamw.
      decay_norm_and_bias=False,
      grad_clip_norm=0.0,  # 0: no clipping.
      grad_accum_steps=1,  # micro-batches per step (scan; the update uses the mean gradient).
  ))
  c.schedule = ConfigDict(dict(
      name="warmup_cosine",  # warmup_cosine, piecewise, constant.
      warmup_steps=0,
      warmup_epochs=0.0,
      warmup_init=0.0,     # warm-up starts at warmup_init * lr.
      end_factor=1e-3,     # cosine ends at end_factor * lr.
      boundaries_epochs=(),  # piecewise: epochs where the lr is multiplied by decay_factor.
      decay_factor=0.1,
  ))
  c.ema_decay = 0.0        # Polyak average of params and batch stats; 0 disables.
  c.log_every_steps = 50
  c.eval_every_steps = 0   # 0: evaluate at the end only.
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.nan_policy = "stop"    # stop (error naming the step) or skip (drop the update).
  c.mesh_data = -1         # devices on the 'data' axis; -1: all not on 'fsdp'.
  c.mesh_fsdp = 1          # devices each large parameter/optimizer array is split over.
  c.progress_bar = True
  c.study = ConfigDict(dict(   # mixjax.study: every method over seeds, one summary table.
      seeds=1,             # seeds config.seed, config.seed + 1, ...
      fgsm_eps=0.0,        # > 0: FGSM error at this fraction of the input range.
      corrupted_labels=0.0,  # > 0: also train with this fraction of labels corrupted.
  ))
  return c


def parse_arg(arg: Optional[str], **defaults: Any) -> ConfigDict:
  """Parses 'k=v,k2=v2,flag' with types taken from `defaults` (bare 'flag' = True)."""
  out = ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    if not item:
      continue
    key, eq, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}; allowed: {sorted(defaults)}.")
    out[key] = _convert(value if eq else "True", defaults[key], key)
  return out


def _convert(text: str, current: Any, key: str) -> Any:
  if isinstance(current, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ValueError(f"{key} must be a boolean (true/false), got {text!r}.")
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if current is None:
      return text
    raise ValueError(f"{key}={text!r} is not a valid {type(current).__name__}.") from None
  if isinstance(current, float) and isinstance(value, int):
    value = float(value)
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  if current is not None and not isinstance(value, type(current)):
    raise ValueError(f"{key}={text!r} must be a {type(current).__name__} like {current!r}.")
  return value


def load_config(spec: str) -> ConfigDict:
  """Loads 'path/to/config.py[:arg]' by calling its `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ValueError(f"--config: no config file {path!r}.")
  name = "mixjax_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  check_schema(config)
  return config


def _flatten(config: ConfigDict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    path = prefix + key
    if isinstance(value, ConfigDict) and path not in FREE_FORM:
      out.update(_flatten(value, path + "."))
    else:
      out[path] = value
  return out


def check_schema(config: ConfigDict) -> None:
  """Raises ValueError if `config` has keys that `base_config()` does not."""
  known = _flatten(base_config())
  extra = sorted(set(_flatten(config)) - set(known))
  if extra:
    raise ValueError(f"Unknown config keys {extra}. " + _suggest(extra[0], known))


def _suggest(key: str, known: Sequence[str]) -> str:
  close = difflib.get_close_matches(key, list(known), n=3)
  return f"Did you mean {close}?" if close else "See mixjax/config_utils.base_config()."


def apply_overrides(config: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
  """Applies 'a.b=value' strings (from `--config.a.b=value`); unknown keys raise ValueError."""
  config = ConfigDict(config.to_dict())
  known = _flatten(config)
  for item in overrides:
    key, eq, text = item.partition("=")
    if not eq:
      raise ValueError(f"Override {item!r} must look like key=value.")
    free = any(key.startswith(f + ".") for f in FREE_FORM)
    if key not in known and not free:
      raise ValueError(f"Unknown config key {key!r}. " + _suggest(key, list(known)))
    parent, _, leaf = key.rpartition(".")
    node = config
    for part in parent.split(".") if parent else []:
      node = node[part]
    if free and leaf not in node:
      node[leaf] = _convert(text, None, key)
    else:
      node[leaf] = _convert(text, node[leaf], key)
  return config


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates '--config.a.b=v' / '--config.a.b v' overrides from the other flags."""
  rest, overrides = [], []
  argv = list(argv)
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      body = arg[len("--config."):]
      if "=" not in body:
        if i + 1 >= len(argv):
          raise ValueError(f"{arg} needs a value.")
        body = body + "=" + argv[i + 1]
        i += 1
      overrides.append(body)
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def methods(config: ConfigDict) -> list[str]:
  """The methods to train in turn ('mixup,erm' -> ['mixup', 'erm'])."""
  return [m.strip() for m in config.method.split(",") if m.strip()]


def _choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
  if value not in allowed:
    raise ValueError(f"config.{name}={value!r} is not allowed; choose one of {list(allowed)}.")


# Integer fields (validate refuses bools and floats) and those that may not be negative.
INTEGER_KEYS = ("seed", "batch_size", "eval_batch_size", "total_steps", "log_every_steps",
                "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints", "mesh_data",
                "mesh_fsdp", "optimizer.grad_accum_steps", "dataset.num_classes",
                "dataset.train_examples", "dataset.eval_examples", "mix.erm_warmup_steps",
                "schedule.warmup_steps")
NON_NEGATIVE_KEYS = ("seed", "eval_batch_size", "total_steps", "eval_every_steps",
                     "num_epochs", "dataset.train_examples", "dataset.eval_examples",
                     "mix.erm_warmup_steps", "schedule.warmup_steps")


def validate(config: ConfigDict) -> None:
  """Checks every value that can be checked without data or devices (ValueError)."""
  check_schema(config)
  runs = methods(config)
  if not runs:
    raise ValueError("config.method is empty; use e.g. 'mixup', 'erm' or 'mixup,erm'.")
  for method in runs:
    try:
      methods_lib.parse(method)
    except ValueError as e:
      raise ValueError(f"config.method: {e}") from None
  try:
    pairing_lib.get_pairing(config.mix.pairing)
  except ValueError as e:
    raise ValueError(f"config.mix.pairing={config.mix.pairing!r}: {e}") from None
  _choice("dataset.name", config.dataset.name, DATASETS)
  _choice("dataset.augment", config.dataset.augment, AUGMENTS)
  _choice("dataset.input_dtype", config.dataset.input_dtype, ("float32", "int32"))
  _choice("optimizer.name", config.optimizer.name, OPTIMIZERS)
  _choice("schedule.name", config.schedule.name, SCHEDULES)
  _choice("mix.loss", config.mix.loss, methods_lib.LOSSES)
  _choice("mix.lam_scope", config.mix.lam_scope, methods_lib.LAM_SCOPES)
  _choice("nan_policy", config.nan_policy, ("stop", "skip"))
  _choice("model.dtype", config.model.dtype, ("float32", "bfloat16", "float16"))
  _choice("amp.mode", config.amp.mode, amp_lib.MODES)
  _choice("amp.variant", config.amp.variant, amp_lib.VARIANTS)
  _choice("mixupe.variant", config.mixupe.variant, mixupe_lib.VARIANTS)
  if isinstance(config.amp.window, bool) or not (isinstance(config.amp.window, int)
                                                  and config.amp.window >= 1):
    raise ValueError(f"config.amp.window must be an integer >= 1, got {config.amp.window!r}.")
  _choice("mixupe.mean", config.mixupe.mean, ("running", "batch"))
  _choice("mixupe.clean_pass", config.mixupe.clean_pass, mixupe_lib.CLEAN_PASSES)
  _choice("mixupe.batch_stats", config.mixupe.batch_stats, mixupe_lib.BATCH_STATS)
  if not 0.0 < config.mixupe.rho <= 1.0:
    raise ValueError(f"config.mixupe.rho must be in (0, 1], got {config.mixupe.rho}.")
  if config.dataset.name == "tfds" and not config.dataset.tfds_name:
    raise ValueError("config.dataset.tfds_name is required when dataset.name='tfds'.")
  if config.dataset.epoch_pairing and config.mix.pairing != "reverse":
    raise ValueError("config.dataset.epoch_pairing=True needs config.mix.pairing='reverse' "
                     "(the pipeline lays out pairs so that reverse pairing matches them).")
  if isinstance(config.study.seeds, bool) or int(config.study.seeds) != config.study.seeds or (
      config.study.seeds < 1):
    raise ValueError(f"config.study.seeds must be an integer >= 1, got {config.study.seeds!r}.")
  if not 0.0 <= config.study.fgsm_eps <= 1.0:
    raise ValueError(f"config.study.fgsm_eps is a fraction of the input range in [0, 1], got "
                     f"{config.study.fgsm_eps}.")
  if not 0.0 <= config.study.corrupted_labels < 1.0:
    raise ValueError(f"config.study.corrupted_labels must be in [0, 1), got "
                     f"{config.study.corrupted_labels}.")
  if not 0.0 <= config.dataset.label_corruption <= 1.0:
    raise ValueError(f"config.dataset.label_corruption must be in [0, 1], got "
                     f"{config.dataset.label_corruption}.")
  flat = _flatten(config)
  for name in INTEGER_KEYS:  # bools are ints to Python: True would pass as batch size 1.
    value = flat.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
      raise ValueError(f"config.{name} must be an integer, got {value!r} "
                       f"({type(value).__name__}); pass e.g. --config.{name}="
                       f"{_flatten(base_config())[name]}.")
  for name in NON_NEGATIVE_KEYS:
    if flat[name] < 0:
      raise ValueError(f"config.{name} must be >= 0, got {flat[name]!r}.")
  positive = {"batch_size": config.batch_size, "mix.alpha": config.mix.alpha,
              "checkpoint_every_steps": config.checkpoint_every_steps,
              "optimizer.grad_accum_steps": config.optimizer.grad_accum_steps,
              "log_every_steps": config.log_every_steps,
              "keep_checkpoints": config.keep_checkpoints, "mesh_fsdp": config.mesh_fsdp,
              "dataset.num_classes": config.dataset.num_classes}
  for name, value in positive.items():
    if not value > 0:
      raise ValueError(f"config.{name} must be > 0, got {value!r}.")
  if config.total_steps <= 0 and config.num_epochs <= 0:
    raise ValueError("Set config.total_steps or config.num_epochs (> 0).")
  if config.batch_size % config.optimizer.grad_accum_steps:
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by "
                     f"config.optimizer.grad_accum_steps={config.optimizer.grad_accum_steps}.")
  if not 0.0 <= config.ema_decay < 1.0:
    raise ValueError(f"config.ema_decay must be in [0, 1), got {config.ema_decay}.")
  if config.optimizer.lr < 0 or config.optimizer.weight_decay < 0:
    raise ValueError("config.optimizer.lr and weight_decay must be >= 0.")
  _validate_mix_extensions(config, runs)
  if config.dataset.input_dtype == "int32" and config.mix.point is None and any(
      methods_lib.parse(m) != ("erm", ()) for m in runs):
    raise ValueError("Integer inputs (token ids) cannot be mixed: set config.mix.point to a "
                     "submodule (e.g. the embedding) for mixing methods.")


def choices() -> dict[str, str]:
  """{config key: its allowed values, as text}, read from the library's registries.

  Only fields with a closed set of values (or a grammar, for `method`) appear;
  `validate` accepts exactly these values.
  """
  grammar = (f"a base {list(methods_lib.BASES)} joined with '+' to wrappers "
             f"{list(methods_lib.WRAPPERS)}; ','-separated: train each in turn")
  return {
      "method": grammar,
      "mix.pairing": str(sorted(pairing_lib._REGISTRY)),  # pylint: disable=protected-access
      "mix.loss": str(list(methods_lib.LOSSES)),
      "mix.lam_scope": str(list(methods_lib.LAM_SCOPES)),
      "amp.mode": str(list(amp_lib.MODES)),
      "amp.variant": str(list(amp_lib.VARIANTS)),
      "mixupe.variant": str(list(mixupe_lib.VARIANTS)),
      "mixupe.mean": str(["running", "batch"]),
      "mixupe.clean_pass": str(list(mixupe_lib.CLEAN_PASSES)),
      "mixupe.batch_stats": str(list(mixupe_lib.BATCH_STATS)),
      "model.dtype": str(["float32", "bfloat16", "float16"]),
      "dataset.name": str(list(DATASETS)),
      "dataset.augment": str(list(AUGMENTS)),
      "dataset.input_dtype": str(["float32", "int32"]),
      "optimizer.name": str(list(OPTIMIZERS)),
      "schedule.name": str(list(SCHEDULES)),
      "nan_policy": str(["stop", "skip"]),
  }


def _comments() -> dict[str, str]:
  """{key: the comment next to it in `base_config`'s source} (its one-line description)."""
  import inspect  # Only the help text needs the source.
  out, group = {}, ""
  for line in inspect.getsource(base_config).splitlines():
    text, _, comment = line.partition("#")
    opened = text.strip().startswith("c.") and "ConfigDict(dict(" in text
    if opened:
      group = text.strip()[2:].split("=")[0].strip() + "."
    key = text.strip()[2:] if text.strip().startswith("c.") else text.strip()
    key = key.split("=")[0].strip()
    if comment and key.isidentifier() and not opened:
      out[(group if not text.strip().startswith("c.") else "") + key] = comment.strip()
    if text.strip() == "))":
      group = ""
  return out


def describe(config: Optional[ConfigDict] = None) -> str:
  """Every config key, one a line: `key = value`, the default, allowed values, description.

  config: a recipe's config; its values are shown, with the `base_config()`
  default where they differ (None: the defaults).
  """
  defaults = _flatten(base_config())
  values = _flatten(config) if config is not None else defaults
  allowed, notes = choices(), _comments()
  lines = []
  for key, default in defaults.items():
    value = values.get(key, default)
    if isinstance(value, ConfigDict):
      value = value.to_dict()
    if isinstance(default, ConfigDict):
      default = default.to_dict()
    line = f"  {key} = {value!r}"
    if value != default:
      line += f"  (default {default!r})"
    if key in allowed:
      line += f"  one of: {allowed[key]}"
    if key in notes:
      line += f"  # {notes[key]}"
    lines.append(line)
  return "\n".join(lines)


def _validate_mix_extensions(config: ConfigDict, runs: Sequence[str]) -> None:
  """The CutMix, BCE-threshold, k-way and lam_scope keys of `config.mix` (ValueError naming it)."""
  m = config.mix
  if m.lam_scope == "pair" and m.pairing != "reverse":
    raise ValueError(f"config.mix.lam_scope='pair' shares lam between examples i and B-1-i "
                     f"(timm's mode='pair'), so it needs config.mix.pairing='reverse', got "
                     f"{m.pairing!r}.")
  if m.lam_scope in ("device", "host") and not m.shard_local:
    raise ValueError(f"config.mix.lam_scope={m.lam_scope!r} needs config.mix.shard_local=True "
                     f"(the objective then knows which {m.lam_scope} holds each example).")
  for name in ("switch_prob", "apply_prob"):
    if not 0.0 <= m[name] <= 1.0:
      raise ValueError(f"config.mix.{name} must be a probability in [0, 1], got {m[name]!r}.")
  if not m.cutmix_alpha >= 0:
    raise ValueError(f"config.mix.cutmix_alpha must be >= 0 (0: no CutMix), got "
                     f"{m.cutmix_alpha!r}.")
  mm = m.cutmix_minmax
  if mm is not None and (not isinstance(mm, (tuple, list)) or len(mm) != 2
                         or not 0.0 < mm[0] < mm[1] <= 1.0):
    raise ValueError(f"config.mix.cutmix_minmax must be None or (lo, hi) with 0 < lo < hi <= 1 "
                     f"(box sides as fractions of the image), got {mm!r}.")
  if m.bce_threshold is not None:
    if m.loss != "bce":
      raise ValueError(f"config.mix.bce_threshold={m.bce_threshold!r} needs "
                       f"config.mix.loss='bce', got {m.loss!r}.")
    if not 0.0 <= m.bce_threshold < 1.0:
      raise ValueError(f"config.mix.bce_threshold must be None or in [0, 1), got "
                       f"{m.bce_threshold!r}.")
  if not isinstance(m.k, int) or m.k < 2:
    raise ValueError(f"config.mix.k must be an integer >= 2 (2: pairwise mixing), got {m.k!r}.")
  if m.k > 2 and m.lam_scope != "example":
    raise ValueError(f"config.mix.k={m.k} (k-way Dirichlet mixing) draws weights per example: "
                     f"set config.mix.lam_scope='example', got {m.lam_scope!r}.")
  for method in runs:
    base, wrappers = methods_lib.parse(method)
    if m.k > 2 and base not in ("mixup", "erm") or m.k > 2 and wrappers:
      raise ValueError(f"config.mix.k={m.k} (k-way Dirichlet mixing) needs method 'mixup' "
                       f"without wrappers, got {method!r}; set config.mix.k=2 otherwise.")
    cutmix = m.cutmix_alpha > 0 or mm is not None
    if base in ("untied", "dat") and cutmix:
      raise ValueError(f"config.mix.cutmix_alpha={m.cutmix_alpha!r} / cutmix_minmax={mm!r}: "
                       f"CutMix switches with mixup only; use method 'mixup', got {method!r}.")
    if base == "mixup" and cutmix and wrappers:
      raise ValueError(f"method {method!r}: {list(wrappers)} are not defined on CutMix (a hard "
                       f"box has no scalar input coefficient); set config.mix.cutmix_alpha=0 "
                       f"or use method 'mixup'.")
    if base != "erm" and not cutmix and m.apply_prob != 1.0:
      raise ValueError(f"config.mix.apply_prob={m.apply_prob!r} needs CutMix switching "
                       f"(config.mix.cutmix_alpha > 0; switch_prob=0 for mixup only), got "
                       f"method {method!r} with cutmix_alpha={m.cutmix_alpha!r}.")
    if base == "mixup" and cutmix and (m.point is not None
                                       or len(config.dataset.input_shape) != 3):
      raise ValueError(f"CutMix (config.mix.cutmix_alpha={m.cutmix_alpha!r}) needs images "
                       f"(config.dataset.input_shape=(H, W, C), got "
                       f"{tuple(config.dataset.input_shape)}) mixed at the input "
                       f"(config.mix.point=None, got {m.point!r}).")


# Config keys that may change between a run and its resumption (logging, checkpoint
# cadence, where the data live, the device mesh, the study around the run); any other
# change needs allow_config_change.
RESUME_FREE_KEYS = ("method", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                    "keep_checkpoints", "progress_bar", "eval_batch_size", "dataset.prefetch",
                    "dataset.data_dir", "mesh_data", "mesh_fsdp", "study.seeds",
                    "study.fgsm_eps", "study.corrupted_labels")


def _flat_json(tree: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix[:-1]: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flat_json(v, f"{prefix}{k}."))
  return out


def config_changes(saved_json: str, config: ConfigDict) -> list[str]:
  """'key: saved -> now' for each config key (outside RESUME_FREE_KEYS) that differs."""
  saved, now = _flat_json(json.loads(saved_json)), _flat_json(json.loads(config.to_json()))
  missing = "<absent>"
  return [f"{k}: {saved.get(k, missing)!r} -> {now.get(k, missing)!r}"
          for k in sorted(set(saved) | set(now))
          if k not in RESUME_FREE_KEYS and saved.get(k, missing) != now.get(k, missing)]
