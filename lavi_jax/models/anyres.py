"""Any-resolution geometry on device (jnp), as Hugging Face computes it in python floats.

``best_grid(image_sizes, pinpoints, tile)`` is HF's ``select_best_resolution``
followed by ``get_anyres_image_grid_shape``: among the ``(h, w)`` canvases in
``pinpoints``, the one that keeps most of the image's pixels when it is resized
into it keeping its aspect ratio, then wastes the least, in ``tile`` units.
HF computes the resized size as ``int(side * min(w / ow, h / oh))`` in float64;
the int32 arithmetic here gives the same integers, float64 rounding included
(image sides below 2**20, pinpoint sides below 2**13). The host-side (python)
versions are in :mod:`lavi_jax.data.anyres`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from lavi_jax.data.anyres import check_pinpoints

MAX_SIDE_BITS = 20  # image sides below 2**20 px
MAX_PINPOINT = 1 << 13


def validate(model_cfg: Any) -> None:
    """Fails naming the value when ``model.anyres`` does not fit the vision tower (pinpoints, max_crops, aspect)."""
    a = model_cfg.get("anyres")
    if a is None or not a.enabled:
        return
    pins = check_pinpoints(a.pinpoints, model_cfg.vision.image_size, a.max_crops)
    for p in pins:
        if max(p) >= MAX_PINPOINT:
            raise ValueError(f"anyres.pinpoints: {p} has a side of {MAX_PINPOINT} px or more")
    max_tiles(a.aspect)


def max_tiles(aspect: str) -> int | None:
    """N of ``"anyres_max_N"`` (None for ``"anyres"``); fails naming any other value."""
    if aspect == "anyres":
        return None
    n = aspect[len("anyres_max_"):]
    if not aspect.startswith("anyres_max_") or not n.isdigit() or int(n) < 1:
        raise ValueError(f"anyres.aspect={aspect!r} is not 'anyres' or 'anyres_max_N'")
    return int(n)


# ----------------------------------------------------------------------------- exact integer helpers
# Arrays broadcast against each other; ``b`` holds pinpoint sides (< 2**13), ``a`` and ``c`` image sides.


def _bit_length(x: jax.Array) -> jax.Array:
    return 32 - jax.lax.clz(x.astype(jnp.int32))


def _divmod_mul(a, b, c, cap: int = 1 << 24):
    """``divmod(a * b, c)`` without overflow for ``b < 2**13``, ``a >= 0``, ``1 <= c < 2**30``; the quotient
    saturates at ``cap`` (then only "at least cap" is meaningful)."""
    a, b, c = jnp.broadcast_arrays(a, b, c)
    aq, ar = a // c, a % c

    def step(j, qr):
        q, r = qr
        q, r = 2 * q, 2 * r
        over = r >= c
        q, r = q + over, jnp.where(over, r - c, r)
        bit = ((b >> (12 - j)) & 1) == 1
        q, r = jnp.where(bit, q + aq, q), jnp.where(bit, r + ar, r)
        over = r >= c
        return jnp.minimum(q + over, cap), jnp.where(over, r - c, r)

    return jax.lax.fori_loop(0, 13, step, (jnp.zeros_like(a), jnp.zeros_like(a)))


def _le_ratio(w, ow, h, oh) -> jax.Array:
    """``w / ow <= h / oh`` exactly (python compares these float64 quotients the same way)."""
    q, r = _divmod_mul(oh, w, ow)  # w * oh = q * ow + r; compare with h * ow
    return (q < h) | ((q == h) & (r == 0))


def _floor_mul_fdiv(a, b, c) -> jax.Array:
    """``int(a * (b / c))`` in float64, for ``a, c`` in [1, 2**20) and ``b`` in [1, 2**13).

    The exact ``floor(a * b / c)`` except where ``a * b / c`` is an integer k and the float64 product
    ``a * fl(b / c)`` rounds to just below k (then k - 1), decided from the rounding of ``b / c``.
    """
    a, b, c = jnp.broadcast_arrays(a, b, c)
    k, rem = _divmod_mul(a, b, c)
    # fl(b / c) = round-half-even(M / c) * 2**(e - 52) with M = b * 2**(52 - e), e = floor(log2(b / c)).
    e0 = _bit_length(b) - _bit_length(c)
    m = jnp.clip(-e0, 0, 30)
    ge = jnp.where(e0 >= 0, b >= (c << jnp.maximum(e0, 0)), b >= ((c + (1 << m) - 1) >> m))
    e = jnp.where(ge, e0, e0 - 1)
    t = 52 - e  # in [40, 73]

    def double_mod(i, x):  # M mod 2c, one doubling of b at a time
        return jnp.where(i < t, jnp.where(2 * x >= 2 * c, 2 * x - 2 * c, 2 * x), x)

    x = jax.lax.fori_loop(0, 74, double_mod, b % (2 * c))
    R, q_odd = x % c, x >= c
    rounded_down = (R > 0) & ((2 * R < c) | ((2 * R == c) & ~q_odd))
    # a * fl(b / c) = k - d with d = a * R / c * 2**(e - 52); fl(k - d) < k iff d > gap / 2, where the double
    # below k is k - 2**(E - 52) (k - 2**(E - 53) when k is a power of two), E = floor(log2 k).
    kk = jnp.maximum(k, 1)
    E = _bit_length(kk) - 1
    pow2 = (kk & (kk - 1)) == 0
    s = E - e - 1 - pow2.astype(jnp.int32)  # d > gap / 2 iff a * R > c * 2**s, s in [-2, 20]

    def double_div(i, qr):  # divmod(c * 2**s, a)
        q, r = qr
        over = 2 * r >= a
        step = i < s
        return jnp.where(step, 2 * q + over, q), jnp.where(step, jnp.where(over, 2 * r - a, 2 * r), r)

    qd, _ = jax.lax.fori_loop(0, MAX_SIDE_BITS + 1, double_div, (c // a, c % a))
    below = jnp.where(s >= 0, R > qd, a * R * (1 << jnp.clip(-s, 0, 2)) > c)
    return jnp.where((rem == 0) & rounded_down & below & (k > 0), k - 1, k)


def fitted_sizes(image_sizes: jax.Array, pinpoints: Sequence[Sequence[int]]) -> tuple[jax.Array, jax.Array]:
    """``(int(oh * s), int(ow * s))`` with ``s = min(w / ow, h / oh)`` per pinpoint (HF's float64 values),
    int32 [..., len(pinpoints)] each."""
    oh = jnp.maximum(image_sizes[..., 0].astype(jnp.int32), 1)[..., None]
    ow = jnp.maximum(image_sizes[..., 1].astype(jnp.int32), 1)[..., None]
    h = jnp.asarray([int(p[0]) for p in pinpoints], jnp.int32)
    w = jnp.asarray([int(p[1]) for p in pinpoints], jnp.int32)
    width_bound = _le_ratio(w, ow, h, oh)
    num = jnp.where(width_bound, w, h)  # s = num / den
    den = jnp.where(width_bound, ow, oh)
    return _floor_mul_fdiv(oh, num, den), _floor_mul_fdiv(ow, num, den)


def best_grid(image_sizes: jax.Array, pinpoints: Sequence[Sequence[int]], tile: int) -> tuple[jax.Array, jax.Array]:
    """``(rows, cols)`` int32 [...] of crops for images of ``image_sizes`` int32 [..., 2] = (height, width).

    The pinpoint with the largest ``min(resized area, image area)``, then the smallest unused canvas area,
    the first on ties (HF's scan). Sizes with a zero side (padding, videos) are read as 1.
    """
    oh = jnp.maximum(image_sizes[..., 0].astype(jnp.int32), 1)[..., None]
    ow = jnp.maximum(image_sizes[..., 1].astype(jnp.int32), 1)[..., None]
    h = jnp.asarray([int(p[0]) for p in pinpoints], jnp.int32)
    w = jnp.asarray([int(p[1]) for p in pinpoints], jnp.int32)
    dh, dw = fitted_sizes(image_sizes, pinpoints)
    upscale = (ow < w) & (oh < h)  # s > 1: min(dw * dh, ow * oh) is the image's own area
    eff = jnp.where(upscale, jnp.minimum(ow, w) * jnp.minimum(oh, h), dw * dh)
    waste = w * h - eff
    best = (eff == eff.max(-1, keepdims=True))
    waste = jnp.where(best, waste, jnp.iinfo(jnp.int32).max)
    best &= waste == waste.min(-1, keepdims=True)
    i = jnp.argmax(best, axis=-1)
    return (h // tile)[i], (w // tile)[i]
