"""Metrics: a tqdm progress bar, JSONL + CSV logs and TensorBoard scalars, without TensorFlow.

`MetricsWriter(workdir)` appends one JSON object per record to
`<workdir>/metrics.jsonl` and a row to `<workdir>/<kind>.csv` ('train' or
'eval'), and writes scalar summaries to `<workdir>/tb/events.out.tfevents.*`
(a TFRecord file of `tensorboard.Event` protos, encoded here by hand: the
format is a fixed 4-field protobuf, so TensorFlow is not needed).
Only process 0 writes. On resume, `truncate(step)` drops records of steps
after the restored checkpoint so the logs read like an uninterrupted run.

A record's kind names a CSV file, so it must match `KIND_PATTERN` (a short
lower-case identifier): `write` refuses other kinds, and `truncate` drops
records read back from `metrics.jsonl` whose kind or step is malformed (a
warning on stderr), so nothing read from a workdir can name a path outside it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import socket
import struct
import sys
import time
from typing import Any, Iterable, Optional

import jax
import numpy as np

# ----------------------------------------------------------------------------- TensorBoard

_CRC_TABLE = []
for _i in range(256):
  _c = _i
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
  _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), as TFRecord files use."""
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  n &= (1 << 64) - 1
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
  return _varint((number << 3) | wire) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
  return _field(number, 2, _varint(len(payload)) + payload)


def encode_event(wall_time: float, step: int, scalars: Optional[dict[str, float]] = None,
                 file_version: Optional[str] = None) -> bytes:
  """A serialised `Event{wall_time=1, step=2, file_version=3, summary=5{value=1{tag=1, simple_value=2}}}`."""
  out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
  if file_version is not None:
    out += _length_delimited(3, file_version.encode())
  if scalars:
    values = b"".join(
        _length_delimited(1, _length_delimited(1, tag.encode()) +
                          _field(2, 5, struct.pack("<f", float(v))))
        for tag, v in scalars.items())
    out += _length_delimited(5, values)
  return out


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: length, masked CRC of the length, data, masked CRC of the data."""
  length = struct.pack("<Q", len(data))
  return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


def read_tfrecords(path: str) -> list[bytes]:
  """Reads the records of a TFRecord file, checking both CRCs (ValueError if damaged)."""
  out = []
  with open(path, "rb") as f:
    blob = f.read()
  pos = 0
  while pos < len(blob):
    length = blob[pos:pos + 8]
    (n,) = struct.unpack("<Q", length)
    (crc_len,) = struct.unpack("<I", blob[pos + 8:pos + 12])
    data = blob[pos + 12:pos + 12 + n]
    (crc_data,) = struct.unpack("<I", blob[pos + 12 + n:pos + 16 + n])
    if crc_len != _masked_crc(length) or crc_data != _masked_crc(data):
      raise ValueError(f"{path}: CRC mismatch at byte {pos}.")
    out.append(data)
    pos += 16 + n
  return out


class TensorBoardWriter:
  """Appends scalar summaries to a new TensorBoard event file in `logdir`."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._f = open(self.path, "ab")
    self._f.write(tfrecord(encode_event(time.time(), 0, file_version="brain.Event:2")))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    finite = {k: v for k, v in values.items() if isinstance(v, (int, float))}
    if finite:
      self._f.write(tfrecord(encode_event(time.time(), step, finite)))

  def flush(self) -> None:
    self._f.flush()

  def close(self) -> None:
    self._f.close()


# ----------------------------------------------------------------------------- JSONL / CSV


def _clean(value: Any) -> Any:
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


KIND_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,31}")


def valid_kind(kind: Any) -> bool:
  """True if `kind` can name a metrics file: a str matching `KIND_PATTERN` in full."""
  return isinstance(kind, str) and KIND_PATTERN.fullmatch(kind) is not None


def _valid_record(r: Any) -> bool:
  return (isinstance(r, dict) and valid_kind(r.get("kind", "train"))
          and isinstance(r.get("step", 0), int) and not isinstance(r.get("step", 0), bool))


class MetricsWriter:
  """Writes records {'step': int, 'kind': 'train'|'eval', ...scalars} to workdir logs.

  With `workdir=None` nothing is written (records are still kept in
  `self.records`). Only process 0 writes files.
  """

  def __init__(self, workdir: Optional[str], tensorboard: bool = True):
    self.records: list[dict[str, Any]] = []
    self.workdir = workdir if jax.process_index() == 0 else None
    self._tb = None
    if self.workdir:
      os.makedirs(self.workdir, exist_ok=True)
      self.jsonl = os.path.join(self.workdir, "metrics.jsonl")
      if tensorboard:
        self._tb = TensorBoardWriter(os.path.join(self.workdir, "tb"))

  def truncate(self, step: int) -> None:
    """Drops logged records with `step > step` (a resumed run recomputes them)."""
    if not self.workdir or not os.path.exists(self.jsonl):
      return
    records = read_jsonl(self.jsonl)
    bad = [r for r in records if not _valid_record(r)]
    if bad:
      print(f"WARNING: {self.jsonl}: dropping {len(bad)} malformed records (kind must match "
            f"{KIND_PATTERN.pattern}, step an int), first {str(bad[0])[:200]}.",
            file=sys.stderr, flush=True)
    keep = [r for r in records if _valid_record(r) and r.get("step", 0) <= step]
    with open(self.jsonl, "w") as f:
      for r in keep:
        f.write(json.dumps(r) + "\n")
    for kind in {r.get("kind", "train") for r in keep} | {"train", "eval"}:
      self._rewrite_csv(kind, [r for r in keep if r.get("kind", "train") == kind])

  def _csv_path(self, kind: str) -> str:
    if not valid_kind(kind):  # Never a path outside the workdir.
      raise ValueError(f"metrics kind {kind!r} must match {KIND_PATTERN.pattern} (e.g. 'train', "
                       "'eval').")
    return os.path.join(self.workdir, f"{kind}.csv")

  def _rewrite_csv(self, kind: str, rows: list[dict[str, Any]]) -> None:
    path = self._csv_path(kind)
    if not rows:
      if os.path.exists(path):
        os.remove(path)
      return
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=fields)
      w.writeheader()
      w.writerows(rows)

  def write(self, step: int, kind: str, values: dict[str, Any]) -> dict[str, Any]:
    """Logs {'step', 'kind', 'time', **values}; `kind` must match `KIND_PATTERN`."""
    if not valid_kind(kind):
      raise ValueError(f"metrics kind {kind!r} must match {KIND_PATTERN.pattern} (e.g. 'train', "
                       "'eval').")
    record = {"step": int(step), "kind": kind, "time": round(time.time(), 3)}
    record.update({k: _clean(v) for k, v in values.items()})
    self.records.append(record)
    if not self.workdir:
      return record
    with open(self.jsonl, "a") as f:
      f.write(json.dumps(record) + "\n")
    path = self._csv_path(kind)
    header = None
    if os.path.exists(path):
      with open(path, newline="") as f:
        header = next(csv.reader(f), None)
    if header is None or set(record) - set(header):
      rows = [r for r in read_jsonl(self.jsonl) if _valid_record(r) and r.get("kind") == kind]
      self._rewrite_csv(kind, rows)
    else:
      with open(path, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=header).writerow(record)
    if self._tb is not None:
      self._tb.scalars(step, {f"{kind}/{k}": v for k, v in record.items()
                              if k not in ("step", "kind", "time")})
      self._tb.flush()
    return record

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """All records of a metrics.jsonl file (a torn last line from a kill is skipped)."""
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out


class ProgressBar:
  """tqdm bar over steps with ETA, loss and images/s (process 0 only; no-op if disabled)."""

  def __init__(self, total: int, initial: int, desc: str, enabled: bool = True):
    self._bar = None
    if enabled and jax.process_index() == 0:
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                       mininterval=0.5)

  def update(self, n: int, postfix: Optional[dict[str, Any]] = None) -> None:
    if self._bar is None:
      return
    if postfix:
      self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                             for k, v in postfix.items()}, refresh=False)
    self._bar.update(n)

  def restart_clock(self) -> None:
    """Measures the rate and ETA from now on (drops the time so far: the compile step's)."""
    if self._bar is None:
      return
    done = self._bar.n
    self._bar.reset(total=self._bar.total)  # Restarts the clock and the rate's running mean,
    self._bar.initial = self._bar.n = self._bar.last_print_n = done  # keeping the steps done.
    self._bar.refresh()

  def write(self, text: str) -> None:
    if self._bar is not None:
      self._bar.write(text)
    elif jax.process_index() == 0:
      print(text, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def format_metrics(values: dict[str, Any], keys: Iterable[str]) -> str:
  return ", ".join(f"{k}={values[k]:.4g}" for k in keys if isinstance(values.get(k), float))


def final_eval(workdir: Optional[str], step: int) -> Optional[dict[str, Any]]:
  """{'eval', 'eval_ema'?, 'train'} of a run whose eval at `step` is in workdir's logs, or None."""
  path = os.path.join(workdir, "metrics.jsonl") if workdir else ""
  if not os.path.exists(path):
    return None
  records = read_jsonl(path)
  evals = [r for r in records if r.get("kind") == "eval" and r.get("step") == step]
  if not evals:
    return None
  rec = evals[-1]
  keys = ("loss", "top1", "top5", "ece", "confidence", "fgsm_top1")
  out = {"eval": {k: rec[k] for k in keys if k in rec},
         "train": next((r for r in reversed(records) if r.get("kind") == "train"), {})}
  if "ema_top1" in rec:
    out["eval_ema"] = {k: rec[f"ema_{k}"] for k in keys if f"ema_{k}" in rec}
  return out


class TrainMetrics:
  """The train loop's per-step metrics: left on device, fetched once per log interval.

  `add` after each step; `flush` fetches what is pending, handles non-finite
  steps (`nan_policy='stop'`: FloatingPointError naming the step; 'skip': the
  step is listed in `skipped_steps` and reported), and writes one 'train'
  record: the interval's means, 'images_per_s' (compile time left out) and
  'epoch'. The bar's postfix shows the loss and img/s.
  """

  def __init__(self, writer: MetricsWriter, bar: ProgressBar, method: str, nan_policy: str,
               steps_per_epoch: float):
    self.writer, self.bar, self.method = writer, bar, method
    self.nan_policy, self.steps_per_epoch = nan_policy, steps_per_epoch
    self.skipped_steps: list[int] = []
    self._pending: list[tuple[int, dict[str, Any]]] = []
    self._t, self._images, self._excluded = time.time(), 0, 0.0

  def add(self, step: int, metrics: dict[str, Any], images: int, excluded_s: float = 0.0) -> None:
    """Step `step`'s metrics (device arrays, incl. bool 'finite'), its images, and seconds
    to leave out of img/s (a step that compiled counts no images and excludes its time)."""
    self._pending.append((step, metrics))
    self._images += images
    self._excluded += excluded_s

  def flush(self) -> None:
    """Fetches pending metrics, stops on non-finite steps, writes the train record."""
    if not self._pending:
      return
    fetched = jax.device_get([m for _, m in self._pending])
    steps_done = [s for s, _ in self._pending]
    self._pending.clear()
    for s, m in zip(steps_done, fetched):
      if not m["finite"]:
        if self.nan_policy == "stop":
          raise FloatingPointError(
              f"[{self.method}] non-finite loss or gradient at step {s} "
              f"(loss={float(m['loss'])}); stopping without saving (the last checkpoint is "
              "intact). Set config.nan_policy='skip' to drop such steps instead.")
        self.skipped_steps.append(s)
        self.bar.write(f"[{self.method}] step {s}: non-finite loss/gradient, update skipped.")
    now = time.time()
    record = {k: float(np.mean([m[k] for m in fetched if k in m])) for k in fetched[-1]}
    if self._images:  # None when the interval held only compiling steps.
      record["images_per_s"] = self._images / max(now - self._t - self._excluded, 1e-9)
    record["epoch"] = (steps_done[-1] + 1) / self.steps_per_epoch
    self._t, self._images, self._excluded = now, 0, 0.0
    self.writer.write(steps_done[-1] + 1, "train", record)
    postfix = {"loss": record["loss"]}
    if "images_per_s" in record:
      postfix["img/s"] = round(record["images_per_s"])
    self.bar.update(0, postfix)
