"""Per-row sampling: every row of a decode step has its own temperature, top_k, top_p and random key.

    tokens = sample_rows(logits, keys, temperature, top_k, top_p)   # [B, V] -> [B] int32

A row with ``temperature == 0`` is greedy (argmax). Otherwise, as
:func:`lavi_jax.generate.sample` does for one row alone: logits divided by the
temperature, restricted to the ``top_k`` largest (0: all; ties with the k-th
kept) and to the smallest set whose probability reaches ``top_p``, then one
categorical draw with the row's key, so a row samples what it would alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lavi_jax.generate import top_p_mask


def _top_k_row(logits: jax.Array, k: jax.Array) -> jax.Array:
    """[V] logits outside the k largest set to -inf; k <= 0 or k >= V: unchanged."""
    V = logits.shape[-1]
    kth = -jnp.sort(-logits)[jnp.clip(k - 1, 0, V - 1)]
    return jnp.where((k > 0) & (k < V) & (logits < kth), -jnp.inf, logits)


def _sample_row(logits, key, temperature, top_k, top_p):
    greedy = jnp.argmax(logits).astype(jnp.int32)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0).astype(logits.dtype)
    scaled = top_p_mask(_top_k_row(scaled, top_k)[None], top_p)
    drawn = jax.random.categorical(key, scaled, axis=-1)[0].astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                top_p: jax.Array) -> jax.Array:
    """logits [B, V] float, keys [B] typed keys, temperature/top_p [B] float32, top_k [B] int32 -> [B] int32."""
    return jax.vmap(_sample_row)(logits, keys, temperature, top_k, top_p)
