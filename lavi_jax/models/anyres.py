"""Any-resolution geometry on device (jnp), as Hugging Face computes it in python floats.

``best_grid(image_sizes, pinpoints, tile)`` is HF's ``select_best_resolution``
followed by ``get_anyres_image_grid_shape``: among the ``(h, w)`` canvases in
``pinpoints``, the one that keeps most of the image's pixels when it is resized
into it keeping its aspect ratio, then wastes the least, in ``tile`` units.
HF computes the resized size as ``int(side * min(w / ow, h / oh))`` in float64;
the int32 arithmetic here gives the same integers, float64 rounding included
(image sides below 2**20, pinpoint sides below 2**13). The host-side (python)
versions are in :mod:`lavi_jax.data.anyres`.

For the concat fusion, :func:`concat_tokens` lays out each item's visual tokens
as HF LLaVA-NeXT / OneVision pack them and :func:`concat_token_mask` gives the
valid slots from geometry alone (see the section comment below).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lavi_jax.data.anyres import check_pinpoints

MAX_SIDE_BITS = 20  # image sides below 2**20 px
MAX_PINPOINT = 1 << 13


def enabled(model_cfg: Any) -> bool:
    """Whether ``config.model.anyres`` is on (configs saved before the knob existed lack it)."""
    a = model_cfg.get("anyres")
    return a is not None and bool(a.enabled)


def validate(model_cfg: Any) -> None:
    """Fails naming the value when ``model.anyres`` does not fit the vision tower (pinpoints, max_crops, aspect)."""
    if not enabled(model_cfg):
        return
    a = model_cfg.anyres
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


# ----------------------------------------------------------------------------- concat: tokens per item, as HF packs them
#
# An item's visual tokens, valid ones first (HF's order), then masked slots:
#   anyres image (>= 2 valid frames): the whole image's P tokens, then the crops' token grid (rows * s, cols * s),
#       s = sqrt(P), unpadded to the image's aspect ratio (HF ``unpad_image``), for "anyres_max_N" bilinearly
#       resized to about N tiles when larger than 1.1**2 * N tiles, row by row with a newline after each row;
#   image with one valid frame (OneVision's images in multi-image prompts): P tokens, then a newline;
#   video (``image_sizes`` (0, 0)): its valid frames' tokens in order; "anyres_max_N" pools each frame to
#       ceil(s / 2) x ceil(s / 2) (bilinear, as OneVision) and ends the video with one newline.


@functools.lru_cache(maxsize=None)
def _resize_tables(height: int, width: int, side: int, max_n: int | None):
    """(nh, nw) int32 [height + 1, width + 1]: grid size after OneVision's ``anyres_max_N`` downsampling."""
    nh = np.zeros((height + 1, width + 1), np.int32)
    nw = np.zeros_like(nh)
    for ch in range(height + 1):
        for cw in range(width + 1):
            nh[ch, cw], nw[ch, cw] = ch, cw
            if max_n is not None:
                ratio = math.sqrt(ch * cw / (max_n * side**2))
                if ratio > 1.1:
                    nh[ch, cw], nw[ch, cw] = int(ch // ratio), int(cw // ratio)
    return nh, nw


def _geometry(model_cfg: Any, side: int):
    a = model_cfg.anyres
    pins = tuple((int(h), int(w)) for h, w in a.pinpoints)
    tile = model_cfg.vision.image_size
    grid_h = max(h // tile for h, _ in pins) * side
    grid_w = max(w // tile for _, w in pins) * side
    return pins, tile, grid_h, grid_w, max_tiles(a.aspect)


def _image_grid_bound(model_cfg: Any, side: int) -> int:
    """Most tokens the crops' grid (with newlines) of any image can give."""
    pins, tile, grid_h, grid_w, max_n = _geometry(model_cfg, side)
    nh, nw = _resize_tables(grid_h, grid_w, side, max_n)
    nl = int(model_cfg.anyres.newline)
    best = 0
    for h, w in pins:
        ch, cw = h // tile * side, w // tile * side
        for u in range(ch + 1):
            best = max(best, int(nh[u, cw]) * (int(nw[u, cw]) + nl))
        for u in range(cw + 1):
            best = max(best, int(nh[ch, u]) * (int(nw[ch, u]) + nl))
    return best


def _pooled_side(model_cfg: Any, side: int) -> int:
    return -(-side // 2) if max_tiles(model_cfg.anyres.aspect) is not None else side


def item_length(model_cfg: Any, num_frames: int, tokens_per_frame: int) -> int:
    """L: the static number of token slots per item (the most any image or video of ``num_frames`` frames needs)."""
    side = math.isqrt(tokens_per_frame)
    if side * side != tokens_per_frame:
        raise ValueError(f"anyres needs a square token grid per frame, got {tokens_per_frame} tokens "
                         "(vision_feature_select_strategy 'full' on a CLIP tower keeps its CLS token)")
    nl = int(model_cfg.anyres.newline)
    ov = max_tiles(model_cfg.anyres.aspect) is not None
    video = num_frames * _pooled_side(model_cfg, side) ** 2 + (nl if ov else 0)
    return max(tokens_per_frame + _image_grid_bound(model_cfg, side), tokens_per_frame + nl, video)


def _plan(model_cfg: Any, item_mask: jax.Array, image_sizes: jax.Array, tokens_per_frame: int):
    """Per item and slot [B, N, L]: the four bilinear source indices into the item's F * P tokens, the weights
    (y0, y1, x0, x1), which slots hold the newline, and which are valid."""
    a = model_cfg.anyres
    B, N, F = item_mask.shape
    P = tokens_per_frame
    side = math.isqrt(P)
    L = item_length(model_cfg, F, P)
    nl = int(a.newline)
    pins, tile, grid_h, grid_w, max_n = _geometry(model_cfg, side)
    sizes = image_sizes.astype(jnp.int32)
    oh, ow = sizes[..., 0], sizes[..., 1]
    frames = jnp.sum(item_mask, axis=-1, dtype=jnp.int32)
    is_image = oh > 0
    patched = is_image & (frames >= 2)

    # crops grid, unpadded as HF's unpad_image (exact for sides below 2**20)
    rows, cols = best_grid(sizes, pins, tile)
    ch, cw = rows * side, cols * side
    ohc, owc = jnp.maximum(oh, 1), jnp.maximum(ow, 1)
    q, r = _divmod_mul(owc, ch, cw)  # ow / oh > cw / ch  <=>  ow * ch > cw * oh
    wider = (q > ohc) | ((q == ohc) & (r > 0))
    new_h = _divmod_mul(ohc, cw, owc)[0]
    new_w = _divmod_mul(owc, ch, ohc)[0]
    pad_y = jnp.where(wider, (ch - new_h) // 2, 0)
    pad_x = jnp.where(wider, 0, (cw - new_w) // 2)
    uh, uw = ch - 2 * pad_y, cw - 2 * pad_x
    th, tw = _resize_tables(grid_h, grid_w, side, max_n)
    uh_c, uw_c = jnp.clip(uh, 0, grid_h), jnp.clip(uw, 0, grid_w)
    nh, nw = jnp.asarray(th)[uh_c, uw_c], jnp.asarray(tw)[uh_c, uw_c]
    nh, nw = jnp.where(patched, nh, 0), jnp.where(patched, nw, 0)

    s = jnp.arange(L, dtype=jnp.int32)[None, None, :]
    ex = lambda x: x[..., None]
    # image slots
    t = s - P
    row_len = ex(nw) + nl
    oy, ox = t // jnp.maximum(row_len, 1), t % jnp.maximum(row_len, 1)
    in_grid = (t >= 0) & (oy < ex(nh))
    grid_newline = in_grid & (ox == ex(nw))
    y0, y1, wy0, wy1 = _bilinear(oy, ex(uh), ex(nh))
    x0, x1, wx0, wx1 = _bilinear(ox, ex(uw), ex(nw))

    def crop_index(y, x):
        Y, X = y + ex(pad_y), x + ex(pad_x)
        crop = (Y // side) * ex(cols) + X // side
        return (1 + crop) * P + (Y % side) * side + X % side

    img_idx = [crop_index(y, x) for y in (y0, y1) for x in (x0, x1)]
    base = s < P
    img_valid = base | jnp.where(ex(patched), in_grid, s < P + nl)
    img_newline = jnp.where(ex(patched), grid_newline, s == P) & (nl > 0)

    # video slots: the k-th valid frame's (pooled) tokens, then one newline (OneVision)
    pside = _pooled_side(model_cfg, side)
    P2 = pside * pside
    order = jnp.argsort(~item_mask, axis=-1, stable=True).astype(jnp.int32)  # valid frames first, in order
    k = jnp.clip(s // P2, 0, F - 1)
    frame = jnp.take_along_axis(order, k, axis=-1)
    j = s % P2
    vy0, vy1, vwy0, vwy1 = _bilinear(j // pside, side, pside)
    vx0, vx1, vwx0, vwx1 = _bilinear(j % pside, side, pside)
    vid_idx = [frame * P + y * side + x for y in (vy0, vy1) for x in (vx0, vx1)]
    nv = ex(frames) * P2
    vid_newline = (s == nv) & (max_n is not None) & (nl > 0)
    vid_valid = (s < nv) | vid_newline

    img = ex(is_image)
    idx = [jnp.where(img, jnp.where(base, s, i), v) for i, v in zip(img_idx, vid_idx)]
    wts = [jnp.where(img, jnp.where(base, one, w), v) for one, w, v in
           ((1.0, wy0, vwy0), (0.0, wy1, vwy1), (1.0, wx0, vwx0), (0.0, wx1, vwx1))]
    newline = jnp.where(img, img_newline, vid_newline)
    valid = jnp.where(img, img_valid, vid_valid) & ex(frames > 0)
    idx = [jnp.clip(i, 0, F * P - 1) for i in idx]
    return idx, wts, newline, valid


def _bilinear(dst, in_size, out_size):
    """torch ``F.interpolate(mode="bilinear", align_corners=False)`` along one axis, float32 as torch computes it:
    source indices (i0, i1) and weights (w0, w1) of output index ``dst``; identity where ``out_size == in_size``."""
    in_size = jnp.asarray(in_size, jnp.int32)
    out_size = jnp.asarray(out_size, jnp.int32)
    scale = in_size.astype(jnp.float32) / jnp.maximum(out_size, 1).astype(jnp.float32)
    src = jnp.maximum(scale * (dst.astype(jnp.float32) + 0.5) - 0.5, 0.0)
    i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), jnp.maximum(in_size - 1, 0))
    lam = jnp.clip(src - i0.astype(jnp.float32), 0.0, 1.0)
    i1 = i0 + (i0 < in_size - 1).astype(jnp.int32)
    same = out_size == in_size
    return (jnp.where(same, dst, i0), jnp.where(same, dst, i1),
            jnp.where(same, 1.0, 1.0 - lam), jnp.where(same, 0.0, lam))


def concat_token_mask(model_cfg: Any, item_mask: jax.Array, image_sizes: jax.Array, tokens_per_frame: int) -> jax.Array:
    """bool [B, N, L]: the valid token slots of each item (a prefix), from geometry alone."""
    return _plan(model_cfg, item_mask, image_sizes, tokens_per_frame)[3]


def concat_tokens(model_cfg: Any, tokens: jax.Array, item_mask: jax.Array, image_sizes: jax.Array,
                  newline: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Projected tokens [B, N, F, P, D] -> (item tokens [B, N, L, D], valid [B, N, L]) in HF's order."""
    B, N, F, P, D = tokens.shape
    idx, (wy0, wy1, wx0, wx1), is_newline, valid = _plan(model_cfg, item_mask, image_sizes, P)
    flat = tokens.reshape(B, N, F * P, D)
    take = lambda i: jnp.take_along_axis(flat, i[..., None], axis=2)
    w = lambda x: x.astype(tokens.dtype)[..., None]
    if max_tiles(model_cfg.anyres.aspect) is None:  # no resampling: every weight is (1, 0)
        out = take(idx[0])
    else:
        out = (take(idx[0]) * w(wx0) + take(idx[1]) * w(wx1)) * w(wy0) + \
              (take(idx[2]) * w(wx0) + take(idx[3]) * w(wx1)) * w(wy1)
    if newline is not None:
        out = jnp.where(is_newline[..., None], newline.astype(out.dtype), out)
    return jnp.where(valid[..., None], out, 0), valid
