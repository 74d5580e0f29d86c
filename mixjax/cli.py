"""The command line of `train.py`: flags, `--config` overrides and `--help`.

`parse_args(argv, usage, default_config)` turns a command line into a
validated config and the other flags; `--help` prints `help_text`: the
recipes in the folder of `default_config` with their purpose, the method
grammar, datasets, models and every config key with its default and allowed
values (from the library's registries, through `config_utils`).
"""

from __future__ import annotations

import argparse
import ast
import os
import textwrap
from typing import Optional, Sequence

import ml_collections

from mixjax import compilation_cache
from mixjax import config_utils
from mixjax import methods
from mixjax import models

_HELP_FLAGS = ("-h", "--help", "--config.help")


def recipes(configs_dir: str) -> dict[str, str]:
  """{'configs/x.py': the first line of its docstring} for each recipe in `configs_dir`."""
  out = {}
  for name in sorted(os.listdir(configs_dir)):
    if name.endswith(".py") and not name.startswith("_"):
      with open(os.path.join(configs_dir, name)) as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
      out[f"configs/{name}"] = doc.strip().split("\n")[0]
  return out


def help_text(usage: str, configs_dir: str, config: Optional[ml_collections.ConfigDict] = None,
              config_spec: Optional[str] = None) -> str:
  """The text after `--help`: usage, recipes, methods, datasets, models, every config key.

  usage: the entry point's docstring (its first paragraph is left out: argparse
  prints it). configs_dir: the recipes' folder. config: the values to list (a
  recipe after overrides); None lists the defaults. config_spec: its `--config`.
  """
  listed = recipes(configs_dir)
  width = max(len(k) for k in listed)
  recipe_lines = "\n".join(f"  {k:<{width}}  {v}" for k, v in listed.items())
  values = (f"config keys, with the values of {config_spec}" if config_spec
            else "config keys and defaults (--help --config configs/x.py: that recipe's values)")
  cache = compilation_cache
  return f"""
{usage.split(chr(10) * 2, 1)[1].rstrip()}

recipes (--config configs/x.py[:arg]):
{recipe_lines}

methods (--config.method):
{textwrap.indent(methods.__doc__.split(chr(10) * 2, 1)[1].strip(), "  ")}
  bases: {", ".join(methods.BASES)}; wrappers: {", ".join(methods.WRAPPERS)}
  examples: mixup, erm, untied+amp, dat, mixup+amp+mixupe, erm+mixupe, 'mixup,erm' (each in turn)

datasets (--config.dataset.name): {", ".join(config_utils.DATASETS)}
models (--config.model.name): {", ".join(models.list_models())}

{values} (--config.key=value):
{config_utils.describe(config)}

compilation cache: compiled programs are kept in ${cache.CACHE_ENV} (default
{cache.DEFAULT_CACHE_DIR}); --no_compilation_cache or {cache.NO_CACHE_ENV}=1 turns it off.
"""


def _print_help(argv: Sequence[str], parser: argparse.ArgumentParser, usage: str,
                default_config: str) -> None:
  """`--help`/`-h`/`--config.help`: prints the help (with --config: that recipe's values)."""
  argv = [a for a in argv if a != "--config.help"]
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--config", default=None)
  known, _ = pre.parse_known_args([a for a in argv if a not in ("-h", "--help")])
  _, overrides = config_utils.split_argv(argv)
  config = None
  if known.config or overrides:
    config = config_utils.apply_overrides(
        config_utils.load_config(known.config or default_config), overrides)
  parser.epilog = help_text(usage, os.path.dirname(default_config), config, known.config)
  parser.print_help()


def parse_args(argv: Sequence[str], usage: str,
               default_config: str) -> tuple[ml_collections.ConfigDict, argparse.Namespace]:
  """Parses the command line into a validated config and the other flags.

  usage: the entry point's docstring (first paragraph: the description).
  default_config: the recipe used without `--config`; its folder holds the
  recipes `--help` lists. `--help` (or `--config.help`) prints `help_text`
  and raises SystemExit(0); bad keys or values raise ValueError.
  """
  rest, overrides = config_utils.split_argv([a for a in argv if a != "--config.help"])
  parser = argparse.ArgumentParser(description=usage.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=default_config,
                      help="config file, optionally with ':arg' (default: configs/digits.py)")
  parser.add_argument("--workdir", default=None,
                      help="checkpoints and logs; an existing checkpoint is resumed")
  parser.add_argument("--max_steps", type=int, default=None,
                      help="stop after this step (schedules still use config.total_steps)")
  parser.add_argument("--allow_config_change", action="store_true",
                      help="resume a checkpoint written with other config values")
  parser.add_argument("--coordinator_address", default=None)
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  parser.add_argument("--no_compilation_cache", action="store_true",
                      help=f"do not keep compiled programs in ${compilation_cache.CACHE_ENV} "
                           f"(default {compilation_cache.DEFAULT_CACHE_DIR}); or set "
                           f"{compilation_cache.NO_CACHE_ENV}=1")
  if set(_HELP_FLAGS) & set(argv):
    _print_help(argv, parser, usage, default_config)
    raise SystemExit(0)
  args = parser.parse_args(rest)
  config = config_utils.apply_overrides(config_utils.load_config(args.config), overrides)
  config_utils.validate(config)
  return config, args
