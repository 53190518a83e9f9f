"""The engine's device side: a fixed set of decode slots and the two compiled programs that use them.

    slots = Slots(model, num_slots=8, max_len=1024, pad_id=0, visual_shape=(N, F, H, W))
    position, first = slots.insert(params, slot, ids, attention, pixel_values, item_mask, image_sizes, seed, *knobs)
    tokens = slots.step(params, fed, index, position, seeds, steps, *knobs)  # every slot; knobs per slot

State (slot = batch row; updated in place: donated):

* ``cache``: the KV cache ``{"k", "v"}`` [layers, slots, max_len, kv_heads, head_dim]. A slot's prefix
  (its prompt, or for ``fusion="concat"`` the prompt with the visual tokens spliced in, left-padded to a
  bucket) fills ``[0, P)``; generated token i is written at ``P + i``.
* ``mask``: [slots, max_len] int32, the slot's key mask (prefix padding 0, the rest 1; keys past a query
  are hidden causally).
* ``visual``: for ``fusion="modulation"``, the conditioners' ``visual_cache`` collection with a batch of
  ``slots`` (row = slot; batch axis per leaf from ``decoder.visual_cache_batch_axes``): the visual keys/values
  of each slot's request, padded to ``visual_shape`` items and frames (padding has ``key_index == NO_ITEM``
  and is invisible). A request's media enter ``insert`` padded only to the next of ``frame_buckets`` (powers of
  two, then the slot's frame count), so the vision tower and the visual keys / values run on the frames it
  uses (a 7-tile anyres photo: 8 frames of the 37 a slot holds); ``insert`` pads its visual cache to the slot's.
  With ``projector.video_pool`` > 1 the frame count decides the tokens per frame, so requests keep the slot's.

``insert`` runs one request (batch 1: the vision tower once, then the prompt) and writes its state into
``slot``; ``step`` is one batched model call over every slot, each row writing and attending at its own
cache index (``cache_index`` int32 [slots]), so slots at different lengths share one program, and
samples every slot's next token (:mod:`lavi_jax.serve.sampling`). A slot computes exactly what the
request computes alone in :class:`lavi_jax.generate.Generator`: the same prompt bucket, positions and
masked padding. The state is allocated by the first ``insert`` on the params' mesh (``allocate``).

Compiled programs: one ``step``; one ``prefill`` per prompt bucket and frame bucket (per bucket and media shape
for concat, whose prefix length follows its items).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lavi_jax.generate import prefill_forward, right_align
from lavi_jax import sharding
from lavi_jax.models.conditioner import NO_ITEM
from lavi_jax.models.decoder import init_cache, visual_cache_batch_axes
from lavi_jax.models.lavi import LaVi
from lavi_jax.models.splice import concat_layout
from lavi_jax.serve.sampling import sample_rows

CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")


class Slots:
    """Decode slots of one model. ``visual_shape`` (items, frames, height, width): a modulation slot's padded
    media; ``anyres``: requests carry ``image_sizes``."""

    def __init__(self, model, *, num_slots: int, max_len: int, pad_id: int, visual_shape: tuple | None = None,
                 anyres: bool = False):
        c = model.config
        self.model, self.num_slots, self.max_len, self.pad_id = model, int(num_slots), int(max_len), int(pad_id)
        self.fusion, self.anyres = c.fusion, bool(anyres)
        self.visual_shape = tuple(visual_shape) if visual_shape and c.fusion == "modulation" else None
        F = self.visual_shape[1] if self.visual_shape else 1
        pooled = int(c.get("projector", {}).get("video_pool", 1)) > 1
        self.frame_buckets = (F,) if pooled else tuple(sorted({2**k for k in range(F.bit_length()) if 2**k < F} | {F}))
        self.num_traces = {"prefill": 0, "step": 0}
        self.cache = self.mask = self.visual = None  # allocated by the first insert, under the caller's mesh
        self._shardings = None  # the state's, when the params have a mesh
        self._prefill = jax.jit(self._prefill_fn, donate_argnames=("cache", "mask", "visual"))
        self._step = jax.jit(self._step_fn, donate_argnames=("cache",))

    def state_shapes(self, params) -> tuple:
        """The slots' state (cache, mask, visual) as ShapeDtypeStructs, on the params' mesh when they have one: the
        KV cache by ``CACHE_AXES``, the visual cache's slot axis over the batch axes and its keys' / values' heads
        over the head axis (each where the mesh divides it), the mask replicated. Works on abstract params (the
        serving capacity benchmark compiles the programs for it). The visual cache's shapes (modulation) come from
        one abstract prefill."""
        c = self.model.config
        visual = None
        if self.visual_shape is not None:
            N, F, H, W = self.visual_shape
            ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
            sizes = jax.ShapeDtypeStruct((1, N, 2), jnp.int32) if self.anyres else None
            shapes = jax.eval_shape(lambda p, x, m, z, i: self._forward_prefill(p, x, m, z, ids=i, mask=i), params,
                                    jax.ShapeDtypeStruct((1, N, F, H, W, 3), jnp.float32),
                                    jax.ShapeDtypeStruct((1, N, F), jnp.bool_), sizes, ids)[3]
            visual = jax.tree.map(lambda s, a: jax.ShapeDtypeStruct(s.shape[:a] + (self.num_slots,) + s.shape[a + 1:],
                                                                    s.dtype), shapes, visual_cache_batch_axes(shapes))
        cache = jax.eval_shape(lambda: init_cache(c.llm, self.num_slots, self.max_len, c.dtype))
        mask = jax.ShapeDtypeStruct((self.num_slots, self.max_len), jnp.int32)
        mesh = next((x.sharding.mesh for x in jax.tree.leaves(params)
                     if isinstance(getattr(x, "sharding", None), NamedSharding)), None)
        if mesh is None:
            return cache, mask, visual

        def visual_axes(a, x):  # [.., slots, S, heads, head_dim] keys / values; else only the slot axis
            names = [None] * x.ndim
            names[a] = "batch"
            if x.ndim - a == 4:
                names[-2] = "heads"
            return PartitionSpec(*names)

        specs = (jax.tree.map(lambda _: PartitionSpec(*CACHE_AXES), cache), PartitionSpec(),
                 None if visual is None else jax.tree.map(visual_axes, visual_cache_batch_axes(visual), visual))
        shardings = sharding.logical_to_sharding(specs, mesh, (cache, mask, visual), uneven=None)
        return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), (cache, mask, visual),
                            shardings)

    def allocate(self, params) -> None:
        """Allocates the slots' state (once; ``insert`` calls it) as a program's output with the shardings of
        :meth:`state_shapes`, the type every later call returns (else each program would be traced twice)."""
        if self.cache is not None:
            return
        shapes = self.state_shapes(params)
        zeros = lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
        if jax.tree.leaves(shapes)[0].sharding is not None:
            self._shardings = jax.tree.map(lambda x: x.sharding, shapes)
            state = jax.jit(zeros, out_shardings=self._shardings)()
        else:
            state = jax.jit(zeros)()
        self.cache, self.mask, self.visual = state

    # -- host-side helpers

    def frames_for(self, frames: int) -> int:
        """The frame bucket a request of ``frames`` frames (per item, at most) is padded to for ``insert``."""
        return next((b for b in self.frame_buckets if b >= frames), self.frame_buckets[-1])

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
        visual cache (batch 1), next position [1])."""
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
        cache = jax.tree.map(lambda a, b: sharding.constrain(jax.lax.dynamic_update_slice_in_dim(a, b, slot, 1),
                                                             CACHE_AXES), cache, new_cache)
        mask = jax.lax.dynamic_update_slice_in_dim(mask, key_mask, slot, 0)
        if visual is not None:
            vc = jax.tree_util.tree_map_with_path(self._pad_frames, vc, visual, visual_cache_batch_axes(vc))
            visual = jax.tree.map(lambda a, b, ax: jax.lax.dynamic_update_slice_in_dim(a, b.astype(a.dtype), slot, ax),
                                  visual, vc, visual_cache_batch_axes(vc))
        if self._shardings is not None:  # the state keeps its shardings (one program type per call)
            mask, visual = jax.lax.with_sharding_constraint((mask, visual), self._shardings[1:])
        keys = jax.random.fold_in(jax.random.key(seed), 0)[None]
        first = sample_rows(logits, keys, temperature[None], top_k[None], top_p[None])[0]
        return cache, mask, visual, first, position[0]

    def _pad_frames(self, path, x, slot_leaf, ax):
        """One leaf of a request's visual cache (batch 1, frames of its bucket) padded to the slot's frames: the
        items' ``key_index`` [.., 1, N, f] with NO_ITEM, keys / values [.., 1, N * f * P, ...] with zeros."""
        want = slot_leaf.shape[:ax] + (1,) + slot_leaf.shape[ax + 1:]
        if x.shape == want:
            return x
        N, F = self.visual_shape[:2]
        if getattr(path[-1], "key", None) == "key_index":
            return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, F - x.shape[-1])], constant_values=NO_ITEM)
        f = x.shape[ax + 1] * F // want[ax + 1]  # the request's frame bucket (P tokens per frame either way)
        grid = x.reshape(x.shape[:ax + 1] + (N, f, -1) + x.shape[ax + 2:])
        widths = [(0, 0)] * grid.ndim
        widths[ax + 2] = (0, F - f)
        return jnp.pad(grid, widths).reshape(want)

    def _step_fn(self, params, cache, mask, visual, tok, index, position, seeds, steps, temperature, top_k, top_p):
        self.num_traces["step"] += 1
        reuse = visual is not None

        variables = {"params": params, "visual_cache": visual} if reuse else {"params": params}
        out = self.model.apply(variables, tok[:, None], attention_mask=mask, position_ids=position[:, None],
                               cache=cache, cache_index=index, use_visual_cache=reuse, method=LaVi.forward)
        logits, cache = out.logits[:, -1], jax.tree.map(lambda a: sharding.constrain(a, CACHE_AXES), out.cache)
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, steps)
        return sample_rows(logits, keys, temperature, top_k, top_p), cache

    # -- calls

    def insert(self, params, slot: int, ids: np.ndarray, attention: np.ndarray, pixel_values, item_mask, image_sizes,
               seed: int, temperature: float, top_k: int, top_p: float) -> tuple[int, int]:
        """Prefills one request (ids/attention [1, T], T a bucket) into ``slot``. -> (next position, first token)."""
        self.allocate(params)
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
