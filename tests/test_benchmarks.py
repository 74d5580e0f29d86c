"""Each benchmark script runs end to end at tiny sizes and prints a complete table.

The figures themselves are not asserted (speed is for the benchmarks, not the
tests); the tables must have every row, with finite positive numbers and ERM
as the 1.0 reference.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _main(name: str):
  spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module.main


def _rows(text: str) -> dict[str, list[str]]:
  """Markdown table rows {first cell: other cells} (header and rule rows dropped)."""
  out = {}
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    header = cells[0] in ("method", "model", "scope")
    if line.startswith("|") and not set(line) <= set("|-") and not header:
      out[cells[0]] = cells[1:]
  return out


def _number(cell: str) -> float:
  return float(re.match(r"[-+0-9.eE]+", cell.replace(",", "")).group(0))


def test_mixup_overhead(capsys):
  _main("mixup_overhead")(["--batch", "8", "--image-size", "8", "--steps", "2"])
  rows = _rows(capsys.readouterr().out)
  assert set(rows) == {"erm", "mixup", "mixup (per-batch lam)", "mixing op alone"}
  assert _number(rows["erm"][1]) == 1.0
  assert all(_number(r[0]) > 0 and math.isfinite(_number(r[1])) for r in rows.values())


def test_methods_overhead(capsys):
  _main("methods_overhead")(["--batch", "8", "--image-size", "8", "--steps", "1",
                             "--only", "amp full,mixupe concat,mixupe rho=0.25"])
  rows = _rows(capsys.readouterr().out)
  assert set(rows) == {"erm", "amp full", "mixupe concat", "mixupe rho=0.25"}
  assert _number(rows["erm"][1]) == 1.0
  for name, cells in rows.items():
    assert all(_number(c) > 0 for c in cells), (name, cells)
  assert _number(rows["amp full"][4]) > 1.2  # XLA's FLOP count: AMP's extra passes are there.
  with pytest.raises(SystemExit):
    _main("methods_overhead")(["--only", "amp"])
  assert "choose from" in capsys.readouterr().err


def test_models_throughput(capsys):
  # The smallest image model of the zoo: the table, not the model, is under test.
  _main("models_throughput")(["--models", "digits_cnn", "--batch", "8", "--image-size", "8",
                              "--steps", "1", "--dtype", "float32", "--num-classes", "10"])
  out = capsys.readouterr().out
  assert "digits_cnn" in out
  line = next(l for l in out.splitlines() if "digits_cnn" in l)
  numbers = [float(v) for v in re.findall(r"\d+\.\d+|\d+", line.replace(",", ""))[1:]]
  assert numbers and all(math.isfinite(v) for v in numbers) and max(numbers) > 0


def test_input_pipeline(capsys):
  pytest.importorskip("tensorflow_datasets")
  _main("input_pipeline")(["--size", "64", "--batch", "4", "--repeats", "1", "--steps", "1",
                           "--step_size", "8", "--step_batch", "8", "--tfds_images", "8",
                           "--tfds_batches", "1", "--model", "digits_cnn"])
  out = capsys.readouterr().out
  for name in ("inception", "cifar pad-crop-flip", "tf.data JPEG", "erm", "mixup", "untied",
               "dat"):
    line = next(l for l in out.splitlines() if l.strip().startswith(name))
    assert float(line.split()[-1]) > 0, line


def test_suite_cpu(capsys):
  # Tiny graphs of the GPU suite's rows (the full `--device cpu` run takes minutes on 2 cores):
  # one model next to its plain reference, one method, the mixing op.
  _main("suite")(["--device", "cpu", "--steps", "1", "--batch", "4", "--models", "vit_b16",
                  "--methods", "mixup"])
  rows = _rows(capsys.readouterr().out)
  rows.pop("row")  # The header.
  assert set(rows) == {"vit_b16 img/s", "vit_b16 MFU %", "vit_b16 GFLOP/step",
                       "vit_b16 MB accessed/step", "vit_b16 fusions", "mixup time / ERM",
                       "mixing op GB/s"}, sorted(rows)
  for name in ("vit_b16 img/s", "vit_b16 GFLOP/step", "mixup time / ERM", "mixing op GB/s"):
    lib, ref, ratio = (_number(c) for c in rows[name])
    assert lib > 0 and ref > 0 and math.isfinite(ratio), (name, rows[name])
  # XLA's count: the library's ERM step has the reference's FLOPs (within 5% on this tiny
  # model, where the finiteness check is a visible share: it computes the update once more,
  # a fixed ~8 FLOPs per parameter; measured 1.034 at batch 4, 1.065 at batch 2).
  assert _number(rows["vit_b16 GFLOP/step"][2]) <= 1.05
  with pytest.raises(SystemExit):
    _main("suite")(["--device", "cpu", "--methods", "amp"])
  assert "choose from" in capsys.readouterr().err


def test_suite_cost_only_compiles_without_running(capsys, monkeypatch):
  # Abstract arguments: nothing may be initialised or executed, only lowered and compiled.
  from mixjax import train_step
  monkeypatch.setattr(train_step, "create_train_state",
                      _no_concrete(train_step.create_train_state))
  _main("suite")(["--device", "cpu", "--cost-only", "--models", "vit_b16", "--batch", "2"])
  out = capsys.readouterr().out
  assert "cost only" in out and "dtype: float32" in out
  rows = _rows(out)
  rows.pop("row")
  assert set(rows) == {f"vit_b16 {r}" for r in (
      "GFLOP/step", "MB accessed/step", "fusions", "compile s",
      "MB accessed/step, zoo model in both", "fusions, zoo model in both")}, sorted(rows)
  for cells in rows.values():
    lib, ref, ratio = (_number(c) for c in cells)
    assert lib > 0 and ref > 0 and math.isfinite(ratio), cells


def _no_concrete(fn):
  """`fn`, refusing concrete (non-traced) array arguments."""
  import jax

  def wrapped(variables, *args, **kwargs):
    assert all(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(variables))
    return fn(variables, *args, **kwargs)
  return wrapped


def test_coeff_sharing(capsys):
  _main("coeff_sharing")(["--model", "digits_cnn", "--image-size", "8", "--batch", "4",
                          "--devices", "2"])
  rows = _rows(capsys.readouterr().out)
  assert set(rows) == {"erm", "per batch", "per host", "per device", "per example", "per pair"}
  assert _number(rows["erm"][0]) == 1.0 and _number(rows["per batch"][2]) == 1.0
  for name, cells in rows.items():
    assert all(_number(c) > 0 for c in cells), (name, cells)
  # No scope adds a collective to the compiled step beyond per-example mixup's.
  assert all(_number(c[4]) <= _number(rows["per example"][4]) for c in rows.values()), rows
