"""Sentence classifiers over word embeddings (the AMP paper's CNN and LSTM backbones).

- `KimCNN` (Kim 2014): 300-d word embeddings, convolutions of widths 3, 4, 5
  with 100 feature maps each, ReLU, max-over-time pooling, dropout 0.5, dense.
- `BiLSTMAttention`: 300-d word embeddings, a single-layer bidirectional LSTM
  (hidden 1024 per direction), additive attention pooling over the valid
  (non-padding) positions, dropout 0.5, dense.

Inputs are token ids int[B, T], 0 = padding. Embeddings are random
(uniform in [-0.25, 0.25], as in Kim 2014) or initialised from a user array
f[vocab, dim] (GloVe-style; an array or the path of a .npy file) and can be
frozen. Mixing points (AMP's "Word" and "Sent" mixing):
'embed' (the pair (word embeddings f[B, T, dim], validity f32[B, T]); see
`TokenEmbed`) and 'sentence' (the sentence vector fed to the classifier).
Token ids cannot be mixed: there is no 'input' point.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mixjax.models import layers

DEFAULT_VOCAB = 20000
DEFAULT_WORD_DIM = 300


class Embeddings:
  """A fixed initial embedding matrix f32[vocab, dim], hashable by identity (a module attribute)."""

  def __init__(self, table: Any):
    if isinstance(table, (str, os.PathLike)):
      table = np.load(table)
    table = np.asarray(table, np.float32)
    if table.ndim != 2 or not np.all(np.isfinite(table)):
      raise ValueError(f"embeddings must be a finite 2-D array (vocab, dim); got shape "
                       f"{table.shape}.")
    self.table = table

  @property
  def shape(self) -> tuple[int, int]:
    return self.table.shape


def _as_embeddings(x: Any) -> Optional[Embeddings]:
  if x is None or isinstance(x, Embeddings):
    return x
  return Embeddings(x)


def _sizes(model: nn.Module) -> tuple[int, int]:
  """(vocab_size, word_dim) of a text model, from its fields or its embedding array."""
  emb = _as_embeddings(model.embeddings)
  vocab = model.vocab_size if model.vocab_size is not None else (
      emb.shape[0] if emb is not None else DEFAULT_VOCAB)
  dim = model.word_dim if model.word_dim is not None else (
      emb.shape[1] if emb is not None else DEFAULT_WORD_DIM)
  return vocab, dim


def _check_text(model: nn.Module) -> None:
  name = type(model).__name__
  layers.check_common(model)
  vocab, dim = _sizes(model)
  if vocab < 2 or dim < 1:
    raise ValueError(f"{name}: vocab_size must be >= 2 and word_dim >= 1, got {vocab}, {dim}.")
  emb = _as_embeddings(model.embeddings)
  if emb is not None and emb.shape != (vocab, dim):
    raise ValueError(f"{name}: embeddings have shape {emb.shape}, but vocab_size={vocab} and "
                     f"word_dim={dim}.")
  if not 0.0 <= model.dropout_rate < 1.0:
    raise ValueError(f"{name}: dropout_rate must be in [0, 1), got {model.dropout_rate!r}.")


class TokenEmbed(nn.Module):
  """Token ids int[B, T] -> (embeddings f[B, T, dim], validity f32[B, T]).

  Validity is 1 for real tokens and 0 for padding (id 0). Mixing this
  submodule's output mixes both, so a mixed sentence is valid wherever either
  of its two sentences is (validity > 0). Ids outside [0, vocab) are read as
  the unknown token (id 1). Parameter: 'embedding' f32[vocab, dim].
  """
  vocab_size: int
  features: int
  embeddings: Optional[Embeddings] = None
  trainable: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    if self.embeddings is None:
      def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -0.25, 0.25)  # Kim (2014).
    else:
      table = self.embeddings.table
      init = lambda key, shape, dtype=jnp.float32: jnp.asarray(table, dtype)  # noqa: E731
    table = self.param("embedding", init, (self.vocab_size, self.features))
    if not self.trainable:
      table = jax.lax.stop_gradient(table)
    ids = jnp.where((tokens >= 0) & (tokens < self.vocab_size), tokens, 1)
    x = jnp.take(table, ids, axis=0).astype(self.dtype)
    return x, (tokens != 0).astype(jnp.float32)


def _embed(model: nn.Module, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The 'embed' submodule of a text model applied to `tokens`."""
  vocab, dim = _sizes(model)
  return TokenEmbed(vocab, dim, _as_embeddings(model.embeddings), model.trainable_embeddings,
                    model.dtype, name="embed")(tokens)


class KimCNN(nn.Module):
  """Kim's CNN: token ids int[B, T] (T >= the widest filter) -> f[B, num_classes] logits.

  Or f32[B, d] unit vectors with head='cosine'. `embeddings`: None, an array
  f[vocab, dim] or a .npy path; `vocab_size`/`word_dim` default to its shape
  (else 20000 / 300). Dropout from the 'dropout' rng.
  """
  num_classes: int = 2
  vocab_size: Optional[int] = None
  word_dim: Optional[int] = None
  filter_sizes: Sequence[int] = (3, 4, 5)
  num_filters: int = 100
  dropout_rate: float = 0.5
  embeddings: Any = None
  trainable_embeddings: bool = True
  dtype: Any = jnp.float32
  head: str = "logits"
  embed_dim: Optional[int] = None

  mixing_points: ClassVar[tuple[str, ...]] = ("embed", "sentence")

  def __post_init__(self):
    if self.embeddings is not None and not isinstance(self.embeddings, Embeddings):
      object.__setattr__(self, "embeddings", Embeddings(self.embeddings))
    _check_text(self)
    if not self.filter_sizes or min(self.filter_sizes) < 1 or self.num_filters < 1:
      raise ValueError(f"KimCNN: filter_sizes and num_filters must be positive, got "
                       f"{self.filter_sizes!r}, {self.num_filters!r}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    layers.check_tokens(tokens, "KimCNN", min_length=max(self.filter_sizes))
    x, _ = _embed(self, tokens)  # Max-pooling runs over padding too (as in Kim 2014).
    pooled = []
    for k in self.filter_sizes:
      h = nn.Conv(self.num_filters, (k,), padding="VALID", dtype=self.dtype, name=f"conv{k}")(x)
      pooled.append(jnp.max(nn.relu(h), axis=1))
    s = layers.Point(name="sentence")(jnp.concatenate(pooled, axis=-1))
    s = nn.Dropout(self.dropout_rate, deterministic=not train)(s)
    return layers.output_head(s, num_classes=self.num_classes, head=self.head,
                              embed_dim=self.embed_dim, dtype=self.dtype)


class AttentionPool(nn.Module):
  """Additive attention pooling: f[B, T, D], bool[B, T] -> f[B, D] = sum_t a_t h_t.

  a = softmax over valid positions of v . tanh(W h_t + b); a sequence with no
  valid position gets uniform weights (never NaN).
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
    u = jnp.tanh(nn.Dense(h.shape[-1], dtype=self.dtype, name="proj")(h))
    scores = nn.Dense(1, use_bias=False, dtype=self.dtype, name="score")(u)[..., 0]
    scores = jnp.where(mask, scores.astype(jnp.float32), -1e9)
    a = jax.nn.softmax(scores, axis=-1).astype(h.dtype)
    return jnp.einsum("bt,btd->bd", a, h)


class BiLSTMAttention(nn.Module):
  """Bidirectional LSTM with attention: token ids int[B, T] -> f[B, num_classes] logits.

  Hidden size `hidden_size` per direction; the sentence vector is
  f[B, 2 * hidden_size]. Padding (id 0) is skipped by both directions and by
  the attention. Embedding options as in `KimCNN`.
  """
  num_classes: int = 2
  vocab_size: Optional[int] = None
  word_dim: Optional[int] = None
  hidden_size: int = 1024
  dropout_rate: float = 0.5
  embeddings: Any = None
  trainable_embeddings: bool = True
  dtype: Any = jnp.float32
  head: str = "logits"
  embed_dim: Optional[int] = None

  mixing_points: ClassVar[tuple[str, ...]] = ("embed", "sentence")

  def __post_init__(self):
    if self.embeddings is not None and not isinstance(self.embeddings, Embeddings):
      object.__setattr__(self, "embeddings", Embeddings(self.embeddings))
    _check_text(self)
    if self.hidden_size < 1:
      raise ValueError(f"BiLSTMAttention: hidden_size must be positive, got {self.hidden_size!r}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    layers.check_tokens(tokens, "BiLSTMAttention")
    x, valid = _embed(self, tokens)
    mask = valid > 0
    lengths = jnp.maximum(jnp.sum(mask, axis=1), 1)
    cell = lambda: nn.OptimizedLSTMCell(self.hidden_size, dtype=self.dtype)  # noqa: E731
    h = nn.Bidirectional(nn.RNN(cell()), nn.RNN(cell()),
                         name="lstm")(x, seq_lengths=lengths)
    s = AttentionPool(self.dtype, name="attention")(h, mask)
    s = layers.Point(name="sentence")(s)
    s = nn.Dropout(self.dropout_rate, deterministic=not train)(s)
    return layers.output_head(s, num_classes=self.num_classes, head=self.head,
                              embed_dim=self.embed_dim, dtype=self.dtype)
