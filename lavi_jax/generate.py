"""Batched generation: one prefill, then a KV-cached decode loop, both compiled once per shape bucket.

    gen = Generator(model, max_new_tokens=64, stop_ids=(eos,))
    tokens, lengths = gen(params, input_ids, attention_mask, pixel_values, item_mask)
    # tokens [B, 64] int32; tokens[b, :lengths[b]] is row b's answer (without the stop token)
    for tok in gen.stream(params, gen.prefill(params, input_ids, ...)):  # or token by token, [B] each step
        ...

or the one-shot ``generate(model, params, input_ids, ..., max_new_tokens=64)``.

Padding and positions. Prompts may be padded on either side (``attention_mask``
marks real tokens). Inside, every row is right-aligned (left-padded) so all rows
share one cache write index, and the prompt length is rounded up to a bucket
(``buckets``), so prompts of nearby lengths reuse one compiled program. Position
ids are ``cumsum(attention_mask) - 1`` as in a full forward: the first real
token of a row is position 0, and generated token i of a row with n real prompt
tokens sits at position n + i. The cache holds the prefix (T prompt tokens, or
for ``fusion="concat"`` the T_out tokens of the prompt with visual tokens
spliced in) followed by ``max_new_tokens - 1`` decode slots; padding keys are
masked, so a padded row decodes exactly as it would alone. The concat prefix
length and mask come from :func:`lavi_jax.models.splice.concat_layout`, i.e.
from shapes, token ids and (anyres) image sizes alone.

Visual inputs. ``fusion="modulation"``: the prefill runs the vision tower once
and each conditioner stores its visual keys/values (``visual_cache``); every
decode step reads them back and never touches the pixels.
``fusion="concat"``: the visual tokens are part of the cached prefix.
Anyres models (``config.model.anyres``) also take ``image_sizes`` int32
[B, N, 2] (each image item's original height and width, see ``data.batch``).

Sampling (:class:`GenerationConfig`): ``temperature=0`` is greedy; otherwise
logits are divided by the temperature, then restricted to the ``top_k``
largest and to the smallest set of tokens whose probability reaches ``top_p``.
Which of these steps run is decided when the program is compiled: greedy takes
an argmax, and the vocabulary is sorted only when ``top_p < 1`` (then only the
``top_k`` largest when ``top_k`` is set).
A row ends at its first stop token; the rest of the row is ``pad_id``. The
decode loop is one ``lax.while_loop`` that exits early once every row stopped.

Under a mesh (``with sharding.use_mesh(mesh)``) the batch follows the inputs'
sharding (batch over the data axes), the KV cache is constrained likewise.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from lavi_jax import sharding
from lavi_jax.data.batch import bucket_length
from lavi_jax.models.decoder import init_cache
from lavi_jax.models.lavi import LaVi, default_positions
from lavi_jax.models.splice import concat_layout

DEFAULT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How the next token is chosen. ``temperature=0``: greedy (``top_k``/``top_p`` unused)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k restriction
    top_p: float = 1.0  # 1.0: no nucleus restriction


# ----------------------------------------------------------------------------- sampling


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """Logits outside the ``k`` largest of the last axis set to -inf (ties with the k-th are kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_mask(logits: jax.Array, p, k: int = 0) -> jax.Array:
    """Keeps the smallest set of most probable tokens whose probability reaches ``p`` (always the top one).

    ``p`` a scalar or per-row [B]. ``k`` > 0: only the ``k`` largest logits can be kept (they are all that is not
    already -inf after :func:`top_k_mask`), so only those are sorted, not the vocabulary."""
    probs = jax.nn.softmax(logits, axis=-1)
    p = jnp.asarray(p, probs.dtype)
    p = p[..., None] if p.ndim == probs.ndim - 1 else p
    if 0 < k < logits.shape[-1]:
        sorted_probs = jax.lax.top_k(probs, k)[0]
    else:
        sorted_probs = -jnp.sort(-probs, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep = mass_before < p
    keep = keep.at[..., 0].set(True)
    threshold = jnp.min(jnp.where(keep, sorted_probs, jnp.inf), axis=-1, keepdims=True)
    return jnp.where((probs >= threshold) | (p >= 1.0), logits, -jnp.inf)


def sample(logits: jax.Array, rng: jax.Array, greedy: bool, top_k: int, temperature, top_p, *,
           nucleus: bool | None = None) -> jax.Array:
    """[B, V] float logits -> [B] int32 tokens.

    Static choices (one program each): ``greedy`` (argmax for every row), ``top_k``, ``nucleus`` (whether any row
    restricts to ``top_p`` < 1; None: decided from ``top_p`` when it is a Python number, else True). Without the
    nucleus nothing is sorted. ``temperature`` and ``top_p`` are scalars or per-row [B] (rows of one batch may
    differ: continuous batching); a row at temperature 0 takes the argmax.
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if nucleus is None:
        nucleus = not isinstance(top_p, (int, float)) or top_p < 1.0
    temperature = jnp.asarray(temperature, logits.dtype)
    t = temperature[..., None] if temperature.ndim == logits.ndim - 1 else temperature
    scaled = logits / jnp.where(t > 0, t, 1)
    scaled = top_k_mask(scaled, top_k)
    if nucleus:
        scaled = top_p_mask(scaled, top_p, top_k)
    tokens = jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
    if temperature.ndim:
        tokens = jnp.where(temperature > 0, tokens, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    return tokens


# ----------------------------------------------------------------------------- the generator


def right_align(input_ids: jax.Array, attention_mask: jax.Array, pad_id: int):
    """Rolls each row so its last real token is in the last column; padding becomes ``pad_id``."""
    T = input_ids.shape[1]
    mask = attention_mask.astype(jnp.int32)
    shift = jnp.argmax(mask[:, ::-1], axis=1)  # padding after the last real token
    idx = (jnp.arange(T)[None, :] - shift[:, None]) % T
    ids = jnp.take_along_axis(input_ids, idx, axis=1)
    mask = jnp.take_along_axis(mask, idx, axis=1)
    return jnp.where(mask > 0, ids, pad_id).astype(jnp.int32), mask


def _static_knobs(sampling: GenerationConfig) -> dict:
    """What of ``sampling`` shapes the compiled program: greedy, top_k and whether a nucleus is drawn."""
    greedy = sampling.temperature == 0
    return dict(greedy=greedy, top_k=0 if greedy else int(sampling.top_k),
                nucleus=not greedy and sampling.top_p < 1.0)


def prefill_forward(model, params, ids, mask, pixel_values, item_mask, image_sizes, cache):
    """The prefill call: right-aligned prompts ``ids`` / ``mask`` [B, T] written at index 0 of an empty ``cache``
    of S slots. -> (DecoderOutput with the last token's logits [B, 1, V] and the filled cache, the mutated
    ``visual_cache`` variables)."""
    T, S = ids.shape[1], cache["k"].shape[2]
    if model.config.fusion == "concat" and pixel_values is not None:  # the model expands the text mask itself
        kw = dict(attention_mask=mask)
    else:
        kw = dict(attention_mask=jnp.pad(mask, ((0, 0), (0, S - T)), constant_values=1),
                  position_ids=default_positions(mask))
    if image_sizes is not None:
        kw["image_sizes"] = image_sizes
    last = jnp.full((ids.shape[0], 1), T - 1, jnp.int32)  # right-aligned: logits of the last token only
    return model.apply({"params": params}, ids, pixel_values, item_mask, cache=cache, cache_index=0,
                       logits_at=last, method=LaVi.forward, mutable=["visual_cache"], **kw)


class Generator:
    """Compiled prefill + decode for one model and one ``max_new_tokens``.

    Programs are cached per (prompt bucket, batch and pixel shapes, greedy,
    top_k, nucleus or not); calls with the same shapes never recompile (``num_traces`` counts
    tracings, i.e. compilations).
    """

    def __init__(self, model, *, max_new_tokens: int, stop_ids: Sequence[int] = (), pad_id: int = 0,
                 buckets: Sequence[int] | None = DEFAULT_BUCKETS):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        c = model.config
        if c.fusion != "none" and pad_id == c.image_token_id:
            raise ValueError("pad_id must differ from image_token_id")
        self.model = model
        self.max_new_tokens = int(max_new_tokens)
        self.stop_ids = tuple(int(s) for s in stop_ids)
        self.pad_id = int(pad_id)
        self.buckets = tuple(buckets) if buckets else None
        self.num_traces = {"prefill": 0, "decode": 0}
        self._prefill = jax.jit(self._prefill_fn)
        self._decode = jax.jit(self._decode_fn, static_argnames=("greedy", "top_k", "nucleus"),
                               donate_argnames=("cache",))
        self._step = jax.jit(self._step_fn, static_argnames=("greedy", "top_k", "nucleus"), donate_argnames=("cache",))

    # -- public

    def __call__(self, params, input_ids, attention_mask=None, pixel_values=None, item_mask=None, image_sizes=None,
                 *, sampling: GenerationConfig = GenerationConfig(), rng: jax.Array | None = None):
        """-> (tokens [B, max_new_tokens] int32, lengths [B] int32)."""
        state = self.prefill(params, input_ids, attention_mask, pixel_values, item_mask, image_sizes)
        return self.decode(params, state, sampling=sampling, rng=rng)

    def prefill(self, params, input_ids, attention_mask=None, pixel_values=None, item_mask=None, image_sizes=None):
        """Runs the prompt (and the vision tower) once; returns the decode state."""
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        attention_mask = jnp.asarray(attention_mask, jnp.int32)
        extra = bucket_length(input_ids.shape[1], self.buckets, beyond="multiple") - input_ids.shape[1]
        if extra:
            input_ids = jnp.pad(input_ids, ((0, 0), (extra, 0)), constant_values=self.pad_id)
            attention_mask = jnp.pad(attention_mask, ((0, 0), (extra, 0)))
        if pixel_values is not None and item_mask is None:
            item_mask = jnp.ones(pixel_values.shape[:3], jnp.bool_)
        if self.model.config.fusion == "none" or pixel_values is None:
            pixel_values = item_mask = image_sizes = None
        return self._prefill(params, input_ids, attention_mask, pixel_values, item_mask, image_sizes)

    def decode(self, params, state, *, sampling: GenerationConfig = GenerationConfig(), rng: jax.Array | None = None):
        """Samples ``max_new_tokens`` from a prefill state (consumed). -> (tokens, lengths)."""
        if rng is None:
            rng = jax.random.key(0)
        rest = {k: v for k, v in state.items() if k != "cache"}
        tokens, lengths, _ = self._decode(params, state["cache"], rest, rng,
                                          jnp.float32(sampling.temperature or 1.0), jnp.float32(sampling.top_p),
                                          **_static_knobs(sampling))
        return tokens, lengths

    def stream(self, params, state, *, sampling: GenerationConfig = GenerationConfig(), rng: jax.Array | None = None):
        """Like ``decode``, one token at a time: yields every row's next token ([B] int32, ``pad_id`` for
        rows that stopped; a row's stop token is yielded) until every row stopped or ``max_new_tokens``."""
        rng = jax.random.key(0) if rng is None else rng
        knobs = _static_knobs(sampling)
        temperature, top_p = jnp.float32(sampling.temperature or 1.0), jnp.float32(sampling.top_p)
        cache, rest = state["cache"], {k: v for k, v in state.items() if k != "cache"}
        tok = sample(rest["logits"], jax.random.fold_in(rng, 0), temperature=temperature, top_p=top_p, **knobs)
        done = jnp.zeros(tok.shape, jnp.bool_)
        stops = jnp.asarray(self.stop_ids, jnp.int32)
        for i in range(self.max_new_tokens):
            if i:
                tok, cache = self._step(params, cache, rest, tok, done, rng, jnp.int32(i), temperature, top_p, **knobs)
            yield jax.device_get(tok)
            done = done | (jnp.isin(tok, stops) if self.stop_ids else False)
            if bool(jnp.all(done)):
                return

    # -- compiled pieces

    def _next_logits(self, variables, state, tok, cache, i, reuse):
        """Feeds generated token i-1 (cache index P+i-1); returns (logits [B, V] for token i, cache)."""
        P = state["mask"].shape[1] - (self.max_new_tokens - 1)
        out = self.model.apply(variables, tok[:, None], attention_mask=state["mask"],
                               position_ids=(state["next_position"] + i - 1)[:, None], cache=cache,
                               cache_index=P + i - 1, use_visual_cache=reuse, method=LaVi.forward)
        return out.logits[:, -1], out.cache

    def _step_fn(self, params, cache, state, tok, done, rng, i, temperature, top_p, *, greedy, top_k, nucleus):
        """One decode step of ``stream``: token i of every row (``pad_id`` where ``done``) and the cache."""
        reuse = bool(state["visual_cache"])
        variables = {"params": params, "visual_cache": state["visual_cache"]} if reuse else {"params": params}
        logits, cache = self._next_logits(variables, state, tok, cache, i, reuse)
        cache = jax.tree.map(lambda a: sharding.constrain(a, _CACHE_AXES), cache)
        new = sample(logits, jax.random.fold_in(rng, i), greedy, top_k, temperature, top_p, nucleus=nucleus)
        return jnp.where(done, self.pad_id, new), cache

    def _prefill_fn(self, params, input_ids, attention_mask, pixel_values, item_mask, image_sizes=None):
        self.num_traces["prefill"] += 1
        model, c = self.model, self.model.config
        ids, mask = right_align(input_ids, attention_mask, self.pad_id)
        B = ids.shape[0]
        concat = c.fusion == "concat" and pixel_values is not None
        modulated = c.fusion == "modulation" and pixel_values is not None
        prefix_mask = mask
        if concat:  # the expanded prefix, from shapes and token ids alone
            prefix_mask = concat_layout(c, ids, mask, item_mask, image_sizes).mask
        P = prefix_mask.shape[1]
        S = P + self.max_new_tokens - 1
        cache = jax.tree.map(lambda a: sharding.constrain(a, _CACHE_AXES), init_cache(c.llm, B, S, c.dtype))
        out, vc = prefill_forward(model, params, ids, mask, pixel_values, item_mask, image_sizes, cache)
        return {
            "cache": out.cache,
            "mask": jnp.pad(prefix_mask.astype(jnp.int32), ((0, 0), (0, S - P)), constant_values=1),
            "next_position": jnp.sum(prefix_mask, axis=1, dtype=jnp.int32),
            "logits": out.logits[:, -1],
            "visual_cache": vc.get("visual_cache", {}) if modulated else {},
        }

    def _decode_fn(self, params, cache, state, rng, temperature, top_p, *, greedy, top_k, nucleus):
        self.num_traces["decode"] += 1
        n, stops, pad = self.max_new_tokens, jnp.asarray(self.stop_ids, jnp.int32), self.pad_id
        B = state["mask"].shape[0]
        reuse = bool(state["visual_cache"])  # modulation with images: conditioners read their cached visual K/V
        variables = {"params": params, "visual_cache": state["visual_cache"]} if reuse else {"params": params}

        def is_stop(tok):
            return jnp.isin(tok, stops) if self.stop_ids else jnp.zeros(tok.shape, jnp.bool_)

        def step(tok, cache, i):
            return self._next_logits(variables, state, tok, cache, i, reuse)

        def choose(logits, i):
            return sample(logits, jax.random.fold_in(rng, i), greedy, top_k, temperature, top_p, nucleus=nucleus)

        tok = choose(state["logits"], 0)
        done = is_stop(tok)
        out = jnp.full((B, n), pad, jnp.int32).at[:, 0].set(tok)
        lengths = jnp.where(done, 0, 1).astype(jnp.int32)

        def cond(carry):
            i, _, _, done, _, _ = carry
            return (i < n) & ~jnp.all(done)

        def body(carry):
            i, tok, cache, done, out, lengths = carry
            logits, cache = step(tok, cache, i)
            cache = jax.tree.map(lambda a: sharding.constrain(a, _CACHE_AXES), cache)
            new = jnp.where(done, pad, choose(logits, i))
            stop = is_stop(new) & ~done
            lengths = jnp.where(done | stop, lengths, i + 1)
            out = jax.lax.dynamic_update_slice_in_dim(out, new[:, None], i, axis=1)
            return i + 1, new, cache, done | stop, out, lengths

        carry = (jnp.int32(1), tok, cache, done, out, lengths)
        _, _, cache, _, out, lengths = jax.lax.while_loop(cond, body, carry)
        return out, lengths, cache  # the cache is returned so it is updated in place (donated)


# ----------------------------------------------------------------------------- one-shot API and timing

_GENERATORS: dict = {}


def generate(model, params, input_ids, attention_mask=None, pixel_values=None, item_mask=None, image_sizes=None, *,
             max_new_tokens: int, sampling: GenerationConfig = GenerationConfig(), rng: jax.Array | None = None,
             stop_ids: Sequence[int] = (), pad_id: int = 0):
    """Generates up to ``max_new_tokens`` per row. -> (tokens [B, max_new_tokens] int32, lengths [B] int32).

    ``tokens[b, :lengths[b]]`` is row b's output; a stopped row then holds its
    stop token and ``pad_id``. Compiled programs are kept per model and settings.
    """
    key = (id(model), int(max_new_tokens), tuple(stop_ids), int(pad_id))
    if key not in _GENERATORS or _GENERATORS[key][0] is not model:
        if len(_GENERATORS) >= 32:
            _GENERATORS.pop(next(iter(_GENERATORS)))
        _GENERATORS[key] = (model, Generator(model, max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id))
    return _GENERATORS[key][1](params, input_ids, attention_mask, pixel_values, item_mask, image_sizes,
                               sampling=sampling, rng=rng)


def measure_speed(generator: Generator, params, input_ids, attention_mask=None, pixel_values=None, item_mask=None, *,
                  repeats: int = 3, sampling: GenerationConfig = GenerationConfig()) -> dict[str, Any]:
    """Times prefill and decode separately (after a compiling warm-up; best of ``repeats``).

    Returns ``prefill_s``, ``decode_s`` and ``decode_tokens_per_s`` (tokens made
    by decode steps, all rows, per second; use a generator without stop ids so
    every row runs ``max_new_tokens``).
    """
    def once():
        t0 = time.perf_counter()
        state = jax.block_until_ready(generator.prefill(params, input_ids, attention_mask, pixel_values, item_mask))
        t1 = time.perf_counter()
        tokens, lengths = jax.block_until_ready(generator.decode(params, state, sampling=sampling))
        return t1 - t0, time.perf_counter() - t1, tokens

    once()
    prefill_s, decode_s, tokens = min((once() for _ in range(max(1, repeats))), key=lambda r: r[1])
    steps = tokens.shape[0] * (generator.max_new_tokens - 1)
    return {"prefill_s": prefill_s, "decode_s": decode_s, "decode_tokens_per_s": steps / decode_s,
            "batch": int(tokens.shape[0]), "max_new_tokens": generator.max_new_tokens}

