"""Random streams from user seeds: any Python int gives a JAX key or a numpy Generator, distinct
seeds distinct streams."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_seed(seed, what: str = "seed") -> int:
    """``seed`` as a Python int, or a ValueError naming it (bools, floats and strings are not seeds)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"{what}={seed!r} must be an integer (any size, negative included)")
    return int(seed)


def seed_key(seed) -> jax.Array:
    """A JAX key from any Python int seed (a key is passed through).

    Seeds in [0, 2**32) give ``jax.random.key(seed)``. JAX (without x64) keeps only the low 32
    bits of a larger seed, so 2**32 would silently repeat seed 0, and 2**64 overflows; every other
    int is hashed (numpy's SeedSequence) into the key's two 32-bit words instead.
    """
    if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
        return seed
    seed = check_seed(seed)
    if 0 <= seed < 2**32:
        return jax.random.key(seed)
    return jax.random.wrap_key_data(np.random.SeedSequence(_entropy(seed)).generate_state(2, np.uint32))


def numpy_rng(seed, *stream: int) -> np.random.Generator:
    """A numpy Generator for ``seed`` and a stream (e.g. the step): ``numpy_rng(seed, step)``.

    For seeds >= 0 this is ``np.random.default_rng([seed, *stream])`` (numpy's own way to key a
    stream by several ints); a negative seed gets a stream of its own.
    """
    seed = check_seed(seed)
    return np.random.default_rng([*_entropy(seed), *stream])


def _entropy(seed: int) -> list[int]:
    """Non-negative words for SeedSequence: the seed itself, or its magnitude tagged as negative."""
    return [seed] if seed >= 0 else [-seed, 0x6E656761]  # "nega": a tag word no non-negative list ends in by default
