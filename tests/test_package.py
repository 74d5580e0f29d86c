"""The package as a new user meets it: `import mixjax`, its extras, its repository address."""

from __future__ import annotations

import configparser
import json
import pathlib
import pkgutil
import re
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

import mixjax
from mixjax import about

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NOTEBOOKS = sorted((ROOT / "colabs").glob("*.ipynb"))

# The modules the README's library map promised but `import mixjax` did not import.
LAZY = ("models", "train_step", "optim", "input_pipeline", "checkpointing", "sharding")
# Heavy dependencies that `import mixjax` must not pull in.
HEAVY = ("orbax", "tensorflow", "tensorboard")


def readme_library_map(text: str) -> list[str]:
  """The `mixjax.xxx` names in the first column of the README's library-map table."""
  names = []
  for line in text.splitlines():
    if line.startswith("| `mixjax."):
      first_cell = line.split("|")[1]
      names += re.findall(r"`mixjax\.(\w+)`", first_cell)
  return names


def package_modules() -> list[str]:
  """Every top-level module and subpackage in mixjax/."""
  return sorted(m.name for m in pkgutil.iter_modules([str(ROOT / "mixjax")]))


_PROBE = """
import json, sys
import mixjax
report = {"file": mixjax.__file__, "dir": dir(mixjax),
          "loaded_at_import": sorted(m for m in sys.modules
                                     if m.split(".")[0] in HEAVY or m in LAZY_FULL)}
resolved = {}
for name in NAMES:
  try:
    module = getattr(mixjax, name)
    resolved[name] = [module.__name__, module is sys.modules.get("mixjax." + name)]
  except AttributeError as e:
    resolved[name] = ["AttributeError: " + str(e), False]
report["resolved"] = resolved
try:
  mixjax.no_such_attribute
  report["error"] = None
except AttributeError as e:
  report["error"] = str(e)
report["hasattr"] = hasattr(mixjax, "also_not_there")
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def fresh_import() -> dict:
  """What a fresh interpreter sees: `import mixjax`, then each name of the README map and LAZY."""
  names = sorted(set(LAZY) | set(readme_library_map(README.read_text())) | set(package_modules()))
  code = (f"HEAVY = {HEAVY!r}\nLAZY_FULL = {tuple('mixjax.' + n for n in LAZY)!r}\n"
          f"NAMES = {names!r}\n" + _PROBE)
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=240)
  assert proc.returncode == 0, proc.stderr
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert pathlib.Path(report["file"]).resolve().parent == ROOT / "mixjax", report["file"]
  return report


def test_import_mixjax_imports_no_heavy_module(fresh_import):
  assert fresh_import["loaded_at_import"] == [], fresh_import["loaded_at_import"]


@pytest.mark.parametrize("name", LAZY)
def test_lazy_submodule_resolves_by_attribute(fresh_import, name):
  assert fresh_import["resolved"][name] == [f"mixjax.{name}", True]
  assert name in fresh_import["dir"]  # listed before it is imported


def test_every_module_of_the_readme_map_is_an_attribute(fresh_import):
  names = readme_library_map(README.read_text())
  assert len(names) >= 18 and {"sampling", "models", "sharding", "mixupe"} <= set(names), names
  for name in names:
    assert fresh_import["resolved"][name] == [f"mixjax.{name}", True], name


def test_every_package_module_is_an_attribute(fresh_import):
  """A new module in mixjax/ goes into __init__: imported there, or in `_LAZY_SUBMODULES`."""
  for name in package_modules():
    assert fresh_import["resolved"][name] == [f"mixjax.{name}", True], name
    assert name in fresh_import["dir"], name


def test_unknown_attribute_still_raises(fresh_import):
  assert fresh_import["error"] == "module 'mixjax' has no attribute 'no_such_attribute'"
  assert fresh_import["hasattr"] is False
  with pytest.raises(AttributeError, match="has no attribute 'models_'"):
    mixjax.models_  # pylint: disable=pointless-statement


def test_readme_map_parser():
  text = ("| module | what |\n|---|---|\n| `mixjax.a` | x `mixjax.z` |\n"
          "| `mixjax.b`, `mixjax.c` | y |\nprose `mixjax.d`\n")
  assert readme_library_map(text) == ["a", "b", "c"]


# Extras.


def _setup_cfg() -> configparser.ConfigParser:
  cfg = configparser.ConfigParser()
  cfg.read(ROOT / "setup.cfg")
  return cfg


def _extra(cfg: configparser.ConfigParser, name: str) -> set[str]:
  lines = cfg["options.extras_require"][name].strip().splitlines()
  return {Requirement(line).name.lower() for line in lines if line.strip()}


@pytest.mark.parametrize("extra, packages", [
    ("notebook", {"notebook", "ipykernel", "nbconvert", "nbclient", "nbformat", "matplotlib"}),
    ("tb", {"tensorboard"}),
    # What tests/test_notebooks.py needs to execute the notebooks.
    ("test", {"nbclient", "nbformat", "ipykernel", "matplotlib"}),
])
def test_extra_covers(extra, packages):
  cfg = _setup_cfg()
  assert extra in cfg["options.extras_require"], f"setup.cfg has no [{extra}] extra"
  missing = packages - _extra(cfg, extra)
  assert not missing, f"setup.cfg's [{extra}] extra lacks {sorted(missing)}"


# The repository's address.


def test_setup_cfg_urls_are_the_repository():
  metadata = _setup_cfg()["metadata"]
  assert metadata["url"] == about.REPOSITORY
  project_urls = dict(line.split(" = ", 1) for line in metadata["project_urls"].strip().splitlines())
  assert project_urls["Source"] == about.REPOSITORY
  for name, url in project_urls.items():
    assert url == about.REPOSITORY or url.startswith(about.REPOSITORY + "/"), (name, url)


def test_colab_url():
  owner_name = about.REPOSITORY.removeprefix("https://github.com/")
  assert owner_name.count("/") == 1, about.REPOSITORY  # https://github.com/OWNER/NAME
  assert about.colab_url("colabs/amp.ipynb") == (
      f"https://colab.research.google.com/github/{owner_name}/blob/main/colabs/amp.ipynb")
  for bad in ["/colabs/amp.ipynb", "colabs/amp.py"]:
    with pytest.raises(ValueError, match="notebook"):
      about.colab_url(bad)
