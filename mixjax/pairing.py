"""Pairings: which example each example is mixed with.

A pairing is `pairing(key, labels, batch_size) -> int32[B]`, the partner index
`j = perm[i]` of every example. The PRNG key comes first, as in every sampler
and policy of mixjax (deterministic pairings ignore it and accept None).
`labels` is int32[B] class ids (or None where unused); `batch_size` is a static
Python int.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

Pairing = Callable[[jax.Array, Optional[jax.Array], int], jax.Array]


def reverse(key: Optional[jax.Array], labels: Optional[jax.Array], batch_size: int) -> jax.Array:
  """Pairs `i` with `B - 1 - i` (the flipped batch, as in many mixup codes)."""
  del key, labels
  return jnp.arange(batch_size, dtype=jnp.int32)[::-1]


def roll(shift: int = 1) -> Pairing:
  """Pairs `i` with `(i + shift) mod B`."""
  def pairing(key: Optional[jax.Array], labels: Optional[jax.Array], batch_size: int) -> jax.Array:
    del key, labels
    return (jnp.arange(batch_size, dtype=jnp.int32) + shift) % batch_size
  return pairing


def random_permutation(key: jax.Array, labels: Optional[jax.Array], batch_size: int) -> jax.Array:
  """A uniformly random permutation of the batch (the mixup paper's choice)."""
  del labels
  return jax.random.permutation(key, batch_size).astype(jnp.int32)


def same_class(key: jax.Array, labels: Optional[jax.Array], batch_size: int) -> jax.Array:
  """Pairs each example with a random other example of the same class.

  Examples are shuffled, grouped by class, and each is paired with the next
  one of its group (cyclically); an example alone in its class pairs with
  itself. `labels`: int32[B] (required).
  """
  if labels is None:
    raise ValueError("same_class pairing needs integer labels; got labels=None.")
  labels = jnp.asarray(labels)
  if labels.ndim != 1 or labels.shape[0] != batch_size:
    raise ValueError(f"labels must be int[{batch_size}] class ids, got shape {labels.shape}.")
  shuffled = jax.random.permutation(key, batch_size)
  order = shuffled[jnp.argsort(labels[shuffled], stable=True)]
  sorted_labels = labels[order]
  start = jnp.searchsorted(sorted_labels, sorted_labels, side="left")
  end = jnp.searchsorted(sorted_labels, sorted_labels, side="right")
  k = jnp.arange(batch_size)
  partner_pos = start + (k - start + 1) % (end - start)
  perm = jnp.zeros(batch_size, jnp.int32).at[order].set(order[partner_pos].astype(jnp.int32))
  return perm


def grouped(pairing: Pairing, num_groups: int) -> Pairing:
  """Applies `pairing` inside each of `num_groups` contiguous groups of the batch.

  Group `g` (examples `g*n .. (g+1)*n - 1`, `n = B / num_groups`) is paired
  with key `fold_in(key, g)`. With one group per device shard this is the
  shard-local pairing: no example is paired across devices.
  """
  if int(num_groups) != num_groups or num_groups < 1:
    raise ValueError(f"num_groups must be a positive integer, got {num_groups!r}.")

  def new_pairing(key: jax.Array, labels: Optional[jax.Array], batch_size: int) -> jax.Array:
    if batch_size % num_groups:
      raise ValueError(
          f"batch size {batch_size} is not divisible by num_groups={num_groups} "
          "(the number of devices along the data axis).")
    n = batch_size // num_groups
    keys = jax.vmap(lambda g: jax.random.fold_in(key, g))(jnp.arange(num_groups))
    labs = None if labels is None else jnp.asarray(labels).reshape(num_groups, n)
    local = jax.vmap(lambda k, l: pairing(k, l, n))(keys, labs)
    offsets = (jnp.arange(num_groups, dtype=jnp.int32) * n)[:, None]
    return (local + offsets).reshape(batch_size).astype(jnp.int32)
  return new_pairing


_REGISTRY = {
    "reverse": reverse,
    "roll": roll(1),
    "random": random_permutation,
    "same_class": same_class,
}


def get_pairing(name: str) -> Pairing:
  """A pairing by name: 'reverse', 'roll', 'random' or 'same_class'."""
  if name not in _REGISTRY:
    raise ValueError(f"Unknown pairing {name!r}; choose one of {sorted(_REGISTRY)}.")
  return _REGISTRY[name]
