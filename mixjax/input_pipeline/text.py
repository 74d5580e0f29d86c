"""Text classification: tokenisation, vocabularies and token-id splits.

A whitespace/punctuation vocabulary of `vocab_size` is built from the training
split (0 = padding, 1 = unknown); sentences are cut/padded to `max_len` tokens.
Used by the local 'tsv' source and the TFDS text datasets.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from mixjax.input_pipeline.datasets import ArrayDataset

_TOKEN = re.compile(r"\w+|[^\w\s]")


def _tokenize(text: str) -> list[str]:
  """Lower-cased word and punctuation tokens."""
  return _TOKEN.findall(text.lower())


def build_vocab(texts: list[str], vocab_size: int) -> dict[str, int]:
  """Most frequent tokens -> ids 2.. (0 = padding, 1 = unknown); ties broken alphabetically."""
  counts = Counter(t for s in texts for t in _tokenize(s))
  ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max(vocab_size - 2, 0)]
  return {tok: i + 2 for i, (tok, _) in enumerate(ordered)}


def encode(texts: list[str], vocab: dict[str, int], max_len: int) -> np.ndarray:
  """int32[N, max_len] token ids, truncated / zero-padded."""
  out = np.zeros((len(texts), max_len), np.int32)
  for i, s in enumerate(texts):
    ids = [vocab.get(t, 1) for t in _tokenize(s)][:max_len]
    out[i, :len(ids)] = ids
  return out


def text_splits(train: tuple[list, list], evals: tuple[list, list], vocab_size: int,
                max_len: int, num_classes: int) -> dict[str, ArrayDataset]:
  """{'train', 'eval'}: ArrayDataset of int32[N, max_len] tokens from (labels, texts) lists.

  Label names are sorted (numerically if they are digits) and numbered 0..;
  the vocabulary comes from the training texts only. ValueError if the
  training split has more than `num_classes` labels or the eval split has
  labels that training lacks.
  """
  names = sorted(set(map(str, train[0])), key=lambda s: (len(s), s) if s.isdigit() else (0, s))
  if len(names) > num_classes:
    raise ValueError(f"the training split has {len(names)} labels {names[:10]}... but "
                     f"dataset.num_classes={num_classes}.")
  ids = {n: i for i, n in enumerate(names)}
  vocab = build_vocab(train[1], vocab_size)
  out = {}
  for split, (labels, texts) in (("train", train), ("eval", evals)):
    unknown = sorted(set(map(str, labels)) - set(ids))
    if unknown:
      raise ValueError(f"labels {unknown[:5]} of the {split} split do not occur in training.")
    out[split] = ArrayDataset(encode(texts, vocab, max_len),
                              np.array([ids[str(l)] for l in labels], np.int32), num_classes)
  return out
