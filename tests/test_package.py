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
  project_urls = dict(line.split(" = ", 1)
                      for line in metadata["project_urls"].strip().splitlines())
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


_GITHUB = re.compile(r"https?://github\.com/[\w.-]+/mixjax\b[^\s\"')\]]*")
_COLAB = re.compile(r"https?://colab\.research\.google\.com/github/[^\s\"')\]]+")


def _notebook_text(path: pathlib.Path) -> str:
  return "\n".join(c["source"] if isinstance(c["source"], str) else "".join(c["source"])
                   for c in json.loads(path.read_text())["cells"])


def _texts() -> dict[str, str]:
  """Every place that spells the repository's address out: README, setup.cfg, notebooks, docs."""
  texts = {"README.md": README.read_text(), "setup.cfg": (ROOT / "setup.cfg").read_text()}
  texts |= {f"colabs/{p.name}": _notebook_text(p) for p in NOTEBOOKS}
  texts |= {f"docs/{p.name}": p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}
  return texts


def address_errors(texts: dict[str, str]) -> list[str]:
  """The repository's addresses (GitHub, Colab) that are not `about.REPOSITORY` or made from it."""
  errors = []
  for where, text in texts.items():
    for url in _GITHUB.findall(text):
      url = url.removesuffix(".git")
      if url != about.REPOSITORY and not url.startswith(about.REPOSITORY + "/"):
        errors.append(f"{where}: {url}")
    for url in _COLAB.findall(text):
      notebook = url.split(f"/blob/{about.BRANCH}/", 1)[-1]
      if url != about.colab_url(notebook) or not (ROOT / notebook).is_file():
        errors.append(f"{where}: {url}")
  return errors


def test_every_address_is_the_repository():
  texts = _texts()
  found = sum(len(_GITHUB.findall(t)) + len(_COLAB.findall(t)) for t in texts.values())
  # Badges (in the notebooks and the README), install cells, setup.cfg.
  assert found >= 3 * len(NOTEBOOKS) + 2, found
  assert address_errors(texts) == []


def test_address_check_catches_a_stale_address():
  owner_name = about.REPOSITORY.removeprefix("https://github.com/")
  stale = {"a": "pip install git+https://github.com/someone-else/mixjax",
           "b": f"https://colab.research.google.com/github/{owner_name}/blob/dev/colabs/amp.ipynb",
           "c": f"[x]({about.colab_url('colabs/no_such_notebook.ipynb')})",
           "d": f"fine: {about.REPOSITORY}.git {about.REPOSITORY}/issues "
                f"{about.colab_url('colabs/amp.ipynb')} https://github.com/google/flax"}
  assert [e.split(":")[0] for e in address_errors(stale)] == ["a", "b", "c"]


def test_readme_has_a_colab_badge_for_every_notebook():
  text = README.read_text()
  for path in NOTEBOOKS:
    assert f"colab-badge.svg)]({about.colab_url(f'colabs/{path.name}')})" in text, path.name


# The notebooks' install cell.


def _install_cell(path: pathlib.Path) -> str:
  cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
  return "".join(cells[0]["source"])


def test_every_notebook_installs_the_same_way():
  cells = {p.name: _install_cell(p) for p in NOTEBOOKS}
  first = cells[NOTEBOOKS[0].name]
  assert f'REPOSITORY = "{about.REPOSITORY}"' in first
  assert "mixjax[notebook] @ git+{REPOSITORY}" in first
  for name, cell in cells.items():
    assert cell == first, f"{name}'s first code cell differs from {NOTEBOOKS[0].name}'s"


@pytest.mark.parametrize("where, importable, expected", [
    ("colabs", True, None),                                        # already installed: nothing
    ("colabs", False, ["-e", f"{ROOT}[notebook]"]),                # in a checkout: from there
    ("elsewhere", False, [f"mixjax[notebook] @ git+{about.REPOSITORY}"]),  # Colab: from GitHub
])
def test_install_cell(monkeypatch, tmp_path, where, importable, expected):
  """Runs the install cell with pip, find_spec and site.addsitedir replaced by fakes."""
  import importlib.util
  import site
  import subprocess as subprocess_module
  import sysconfig
  calls, sitedirs = [], []
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
      real_find_spec(name, *a) if name != "mixjax" or importable else None))
  monkeypatch.setattr(subprocess_module, "check_call", lambda args: calls.append(args))
  monkeypatch.setattr(site, "addsitedir", sitedirs.append)
  monkeypatch.chdir(ROOT / "colabs" if where == "colabs" else tmp_path)
  exec(compile(_install_cell(NOTEBOOKS[0]), "<install cell>", "exec"), {})
  if expected is None:
    assert calls == [] and sitedirs == []
    return
  assert calls == [[sys.executable, "-m", "pip", "install", "-q", *expected]]
  # An editable install is activated in the running kernel: its .pth is read now.
  assert sitedirs == ([sysconfig.get_paths()["purelib"]] if "-e" in expected else [])
