"""What the experiments share besides the package: command line, reports and figures.

Models come from `mixjax.models`, training from `mixjax.train_step` (looped by
`mixjax.experiments.training.fit`), objectives from `mixjax.objectives` /
`mixjax.methods` and policies from `mixjax.policies`; the data helpers are in
`mixjax.experiments.data`.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from mixjax.experiments import training

# ----------------------------------------------------------------------------- command line


def make_parser(name: str, doc: Optional[str]) -> argparse.ArgumentParser:
  """A parser with the flags every experiment has: --quick, --out, --seed."""
  parser = argparse.ArgumentParser(prog=f"python -m mixjax.experiments.{name}",
                                   description=(doc or "").split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="a CPU-minutes version: small models, few steps (and fast, "
                           "unoptimised compilation)")
  parser.add_argument("--out", default=os.path.join("results", name),
                      help=f"output folder for {name}.md and the PNG figures "
                           f"(default: results/{name})")
  parser.add_argument("--seed", type=int, default=0, help="base random seed")
  return parser


def jit(fn: Callable, *, fast: bool, **kwargs) -> Callable:
  """`jax.jit(fn, **kwargs)`; `fast` turns XLA's backend optimisations off.

  For --quick runs of tiny models compilation dominates the run time; this
  roughly halves it (the computed values do not change beyond rounding).
  """
  if fast:
    kwargs["compiler_options"] = training.FAST_COMPILE
  return jax.jit(fn, **kwargs)


def csv_floats(text: str) -> list[float]:
  """'0.2,0.5' -> [0.2, 0.5] (argparse type)."""
  try:
    return [float(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def csv_names(text: str) -> list[str]:
  """'erm,mixup' -> ['erm', 'mixup'] (argparse type)."""
  return [t.strip() for t in text.split(",") if t.strip()]


# ----------------------------------------------------------------------------- reports


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A Markdown table; cells are str()-ed."""
  lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def pct(x: float, digits: int = 2) -> str:
  """A fraction as a percentage string."""
  return f"{100.0 * x:.{digits}f}"


def mean_std(values: Sequence[float], digits: int = 2, scale: float = 100.0) -> str:
  """'mean ± std' (population std) of values, scaled (default: to percent)."""
  v = np.asarray(values, np.float64) * scale
  return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"


def write_report(out: str, name: str, title: str, sections: Sequence[str]) -> str:
  """Writes `<out>/<name>.md` (title + sections), prints it and returns its path."""
  os.makedirs(out, exist_ok=True)
  text = f"# {title}\n\n" + "\n\n".join(s.strip() for s in sections) + "\n"
  path = os.path.join(out, f"{name}.md")
  with open(path, "w") as f:
    f.write(text)
  print(text)
  print(f"[wrote {path}]")
  return path


# ----------------------------------------------------------------------------- figures


def pyplot():
  """matplotlib.pyplot with the Agg backend (no display needed)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def save_figure(fig, out: str, filename: str) -> str:
  """Saves a matplotlib figure as `<out>/<filename>` (PNG) and closes it."""
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, filename)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  pyplot().close(fig)
  return path
