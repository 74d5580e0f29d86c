"""Every Python code block in the README and docs/ runs, so the docs cannot drift."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _blocks():
  for path in DOCS:
    for i, code in enumerate(BLOCK.findall(path.read_text())):
      yield pytest.param(code, id=f"{path.name}-{i}")


@pytest.mark.parametrize("code", list(_blocks()))
def test_code_block_runs(code):
  exec(compile(code, "<doc>", "exec"), {"__name__": "__doc__"})


def test_readme_opens_with_the_two_commands():
  text = (ROOT / "README.md").read_text()
  first = re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
  assert len(first) == 2 and first[0].endswith("python train.py")
  ci = (ROOT / ".ci" / "run").read_text()
  assert first[1] in ci  # CI runs exactly the README's test command.


def test_api_reference_builds_without_warnings(tmp_path):
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d",
                         str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  api = (tmp_path / "site" / "api" / "index.html").read_text()
  for name in ["sample_beta", "mix_batch", "mix_at", "negative_cosine", "get_objective"]:
    assert name in api


def _train_commands():
  import shlex
  for path in DOCS + [ROOT / "train.py"]:  # train.py's usage lines too
    text = path.read_text().replace("\\\n", " ")
    for m in re.finditer(r"python train\.py([^\"\n`]*)", text):
      args = shlex.split(m.group(1), comments=True)
      if "..." not in args:
        yield pytest.param(args, id=f"{path.name}:{' '.join(args)[:60]}")


@pytest.mark.parametrize("args", list(_train_commands()))
def test_documented_train_commands_parse(args):
  # Every `python train.py ...` line in the docs names real configs and valid overrides.
  import train  # The repository root is on sys.path (pyproject's pytest `pythonpath`).
  from mixjax import cli, from_config, input_pipeline, optim
  config, _ = cli.parse_args(args, train.__doc__, train.DEFAULT_CONFIG)
  assert config.batch_size > 0
  if config.dataset.name != "tfds":  # What needs the data but no compiling: the schedule.
    n = len(input_pipeline.load_arrays(config.dataset, seed=config.seed)["train"])
    optim.make_schedule(config, *from_config.total_steps(config, n))
