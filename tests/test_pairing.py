"""Pairings: permutations, class constraints, shard-local groups."""

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixjax import pairing


def _is_perm(p, n):
  return sorted(np.asarray(p).tolist()) == list(range(n))


def test_reverse_and_roll():
  np.testing.assert_array_equal(pairing.reverse(None, None, 5), [4, 3, 2, 1, 0])
  np.testing.assert_array_equal(pairing.roll(2)(None, None, 5), [2, 3, 4, 0, 1])


class RandomTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_random_permutation_is_a_permutation_and_deterministic(self):
    f = self.variant(lambda k: pairing.random_permutation(k, None, 32))
    p1, p2 = f(jax.random.key(0)), f(jax.random.key(0))
    assert _is_perm(p1, 32)
    np.testing.assert_array_equal(p1, p2)
    assert not np.array_equal(p1, f(jax.random.key(1)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_same_class_pairs_within_class(self):
    labels = jnp.array([0, 1, 2, 0, 1, 2, 0, 1, 3, 0])
    f = self.variant(lambda k, l: pairing.same_class(k, l, 10))
    for seed in range(5):
      p = np.asarray(f(jax.random.key(seed), labels))
      assert _is_perm(p, 10)
      np.testing.assert_array_equal(np.asarray(labels)[p], labels)
      assert p[8] == 8  # Alone in class 3: pairs with itself.
      others = [i for i in range(10) if i != 8]
      assert all(p[i] != i for i in others)  # Everyone else has a real partner.


def test_same_class_needs_labels():
  with pytest.raises(ValueError, match="labels"):
    pairing.same_class(jax.random.key(0), None, 4)


def test_grouped_stays_inside_groups():
  f = pairing.grouped(pairing.random_permutation, 4)
  p = np.asarray(f(jax.random.key(0), None, 32))
  assert _is_perm(p, 32)
  np.testing.assert_array_equal(p // 8, np.arange(32) // 8)
  # Group g uses fold_in(key, g): the same as running the pairing on the group alone.
  g2 = pairing.random_permutation(jax.random.fold_in(jax.random.key(0), 2), None, 8)
  np.testing.assert_array_equal(p[16:24], np.asarray(g2) + 16)


def test_grouped_same_class():
  labels = jnp.array([0, 0, 1, 1, 0, 1, 1, 0])
  p = np.asarray(pairing.grouped(pairing.same_class, 2)(jax.random.key(3), labels, 8))
  np.testing.assert_array_equal(np.asarray(labels)[p], labels)
  np.testing.assert_array_equal(p // 4, np.arange(8) // 4)


def test_grouped_bad_batch():
  with pytest.raises(ValueError, match="divisible"):
    pairing.grouped(pairing.reverse, 3)(jax.random.key(0), None, 8)


def test_registry():
  assert pairing.get_pairing("random") is pairing.random_permutation
  with pytest.raises(ValueError, match="Unknown pairing"):
    pairing.get_pairing("nearest")


def test_the_key_comes_first():
  for p in (pairing.reverse, pairing.roll(1), pairing.random_permutation, pairing.same_class,
            pairing.grouped(pairing.random_permutation, 2)):
    assert list(inspect.signature(p).parameters) == ["key", "labels", "batch_size"]
