"""The engine's device side: a fixed set of decode slots and the two compiled programs that use them.

    slots = Slots(model, num_slots=8, max_len=1024, pad_id=0, visual_shape=(N, F, H, W))
    position, first = slots.insert(params, slot, ids, attention, pixel_values, item_mask, image_sizes, seed, *knobs)
    tokens = slots.step(params, fed, index, position, seeds, steps, *knobs)  # every slot; knobs per slot

State (all with a leading slot axis, updated in place: donated):

* ``cache``: the KV cache ``{"k", "v"}`` [slots, layers, 1, max_len, kv_heads, head_dim]. A slot's prefix
  (its prompt, or for ``fusion="concat"`` the prompt with the visual tokens spliced in, left-padded to a
  bucket) fills ``[0, P)``; generated token i is written at ``P + i``.
* ``mask``: [slots, max_len] int32, the slot's key mask (prefix padding 0, the rest 1; keys past a query
  are hidden causally).
* ``visual``: for ``fusion="modulation"``, the conditioners' visual keys/values of the slot's request,
  padded to ``visual_shape`` items and frames (padding has ``key_index == NO_ITEM`` and is invisible).

``insert`` runs one request (batch 1: the vision tower once, then the prompt) and writes its state into
``slot``; ``step`` feeds every slot's last token at its own cache index (each slot is a batch-1 model call
under ``jax.vmap``, so slots at different lengths share one program) and samples every slot's next token
(:mod:`lavi_jax.serve.sampling`). A slot computes exactly what the request computes alone in
:class:`lavi_jax.generate.Generator`: the same prompt bucket, positions and masked padding.

Compiled programs: one ``step``; one ``prefill`` per prompt bucket (per bucket and media shape for concat,
whose prefix length follows its items).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lavi_jax.generate import prefill_forward, right_align
from lavi_jax.models.decoder import init_cache
from lavi_jax.models.lavi import LaVi
from lavi_jax.models.splice import concat_layout
from lavi_jax.serve.sampling import sample_rows


class Slots:
    """Decode slots of one model. ``visual_shape`` (items, frames, height, width): a modulation slot's padded
    media; ``anyres``: requests carry ``image_sizes``."""

    def __init__(self, model, *, num_slots: int, max_len: int, pad_id: int, visual_shape: tuple | None = None,
                 anyres: bool = False):
        c = model.config
        self.model, self.num_slots, self.max_len, self.pad_id = model, int(num_slots), int(max_len), int(pad_id)
        self.fusion, self.anyres = c.fusion, bool(anyres)
        self.visual_shape = tuple(visual_shape) if visual_shape and c.fusion == "modulation" else None
        self.num_traces = {"prefill": 0, "step": 0}
        one = init_cache(c.llm, 1, self.max_len, c.dtype)
        self.cache = jax.tree.map(lambda a: jnp.zeros((self.num_slots,) + a.shape, a.dtype), one)
        self.mask = jnp.zeros((self.num_slots, self.max_len), jnp.int32)
        self.visual = None
        self._prefill = jax.jit(self._prefill_fn, donate_argnames=("cache", "mask", "visual"))
        self._step = jax.jit(self._step_fn, donate_argnames=("cache",))

    def init_visual(self, params) -> None:
        """Allocates the slots' visual cache (modulation): its shapes come from one abstract prefill."""
        if self.visual_shape is None or self.visual is not None:
            return
        N, F, H, W = self.visual_shape
        ids = jnp.zeros((1, 8), jnp.int32)
        sizes = jnp.zeros((1, N, 2), jnp.int32) if self.anyres else None
        shapes = jax.eval_shape(functools.partial(self._forward_prefill, ids=ids, mask=jnp.ones_like(ids)), params,
                                jnp.zeros((1, N, F, H, W, 3), jnp.float32), jnp.zeros((1, N, F), jnp.bool_), sizes)
        self.visual = jax.tree.map(lambda s: jnp.zeros((self.num_slots,) + s.shape, s.dtype), shapes[3])

    # -- host-side helpers

    def prefix_length(self, T: int, item_mask, image_sizes) -> int:
        """P, the cached prefix of a prompt bucketed to T tokens (T itself unless concat with media)."""
        if self.fusion != "concat" or item_mask is None:
            return int(T)
        ids = jax.ShapeDtypeStruct((1, T), jnp.int32)
        sizes = None if image_sizes is None else jax.ShapeDtypeStruct((1,) + np.shape(image_sizes), jnp.int32)
        m = jax.ShapeDtypeStruct((1,) + np.shape(item_mask), jnp.bool_)
        layout = jax.eval_shape(lambda i, k, s: concat_layout(self.model.config, i, i, k, s), ids, m, sizes)
        return int(layout.mask.shape[1])

    # -- programs

    def _forward_prefill(self, params, pixel_values, item_mask, image_sizes, *, ids, mask):
        """One request's prompt -> (cache [layers, 1, max_len, ...], key mask [1, max_len], last logits [1, V],
        visual cache, next position [1])."""
        model, c = self.model, self.model.config
        ids, mask = right_align(ids, mask, self.pad_id)
        S = self.max_len
        concat = c.fusion == "concat" and pixel_values is not None
        prefix = concat_layout(c, ids, mask, item_mask, image_sizes).mask if concat else mask
        P = prefix.shape[1]
        out, vc = prefill_forward(model, params, ids, mask, pixel_values, item_mask, image_sizes,
                                  init_cache(c.llm, 1, S, c.dtype))
        key_mask = jnp.pad(prefix.astype(jnp.int32), ((0, 0), (0, S - P)), constant_values=1)
        return out.cache, key_mask, out.logits[:, -1], vc.get("visual_cache", {}), jnp.sum(prefix, 1, dtype=jnp.int32)

    def _prefill_fn(self, params, cache, mask, visual, slot, ids, attention, pixel_values, item_mask, image_sizes,
                    seed, temperature, top_k, top_p):
        self.num_traces["prefill"] += 1
        new_cache, key_mask, logits, vc, position = self._forward_prefill(params, pixel_values, item_mask, image_sizes,
                                                                          ids=ids, mask=attention)
        cache = jax.tree.map(lambda a, b: jax.lax.dynamic_update_index_in_dim(a, b, slot, 0), cache, new_cache)
        mask = jax.lax.dynamic_update_index_in_dim(mask, key_mask[0], slot, 0)
        if visual is not None:
            visual = jax.tree.map(lambda a, b: jax.lax.dynamic_update_index_in_dim(a, b, slot, 0), visual, vc)
        keys = jax.random.fold_in(jax.random.key(seed), 0)[None]
        first = sample_rows(logits, keys, temperature[None], top_k[None], top_p[None])[0]
        return cache, mask, visual, first, position[0]

    def _step_fn(self, params, cache, mask, visual, tok, index, position, seeds, steps, temperature, top_k, top_p):
        self.num_traces["step"] += 1
        reuse = visual is not None

        def one(cache, vc, m, t, i, p):
            variables = {"params": params, "visual_cache": vc} if reuse else {"params": params}
            out = self.model.apply(variables, t[None, None], attention_mask=m[None], position_ids=p[None, None],
                                   cache=cache, cache_index=i, use_visual_cache=reuse, method=LaVi.forward)
            return out.logits[0, -1], out.cache

        logits, cache = jax.vmap(one)(cache, visual, mask, tok, index, position)
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, steps)
        return sample_rows(logits, keys, temperature, top_k, top_p), cache

    # -- calls

    def insert(self, params, slot: int, ids: np.ndarray, attention: np.ndarray, pixel_values, item_mask, image_sizes,
               seed: int, temperature: float, top_k: int, top_p: float) -> tuple[int, int]:
        """Prefills one request (ids/attention [1, T], T a bucket) into ``slot``. -> (next position, first token)."""
        self.init_visual(params)
        self.cache, self.mask, self.visual, first, position = self._prefill(
            params, self.cache, self.mask, self.visual, jnp.int32(slot), ids, attention, pixel_values, item_mask,
            image_sizes, jnp.uint32(seed), jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
        first, position = jax.device_get((first, position))
        return int(position), int(first)

    def step(self, params, tok, index, position, seeds, steps, temperature, top_k, top_p) -> np.ndarray:
        """Feeds tok [slots] at index [slots] (position ids ``position``); -> next tokens [slots] int32."""
        args = (np.asarray(tok, np.int32), np.asarray(index, np.int32), np.asarray(position, np.int32),
                np.asarray(seeds, np.uint32), np.asarray(steps, np.int32), np.asarray(temperature, np.float32),
                np.asarray(top_k, np.int32), np.asarray(top_p, np.float32))
        new, self.cache = self._step(params, self.cache, self.mask, self.visual, *args)
        return np.asarray(jax.device_get(new))
