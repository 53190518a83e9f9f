"""What trains and how: trainable-param selection (stages, regexes) and the AdamW optimizer.

* Trainable params are selected by regular expressions over ``/``-joined
  param paths (``config.train.trainable``, plus the LoRA adapters of
  ``config.train.lora``); frozen params receive no gradient, carry no optimizer
  state and stay bit-identical.
* AdamW with linear warmup + cosine decay and global-norm clipping; weight
  decay on kernels and embedding tables only (by param name, see ``decays``:
  never on biases, norm scales or single learned vectors, scanned or not);
  ``config.train.lr_mults`` scales the learning rate of the params whose path
  matches a regex (first match wins).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from lavi_jax import lora

# Stage presets for ``config.train.trainable``.
STAGES = {
    # image_newline (anyres concat) is new with the projector and trains with it.
    "projector+conditioners": (r"^projector/", r"conditioner", r"^image_newline$"),
    "projector+conditioners+llm": (r"^projector/", r"conditioner", r"^image_newline$", r"^llm/"),
    "all": (r".*",),
}


def trainable_patterns(trainable) -> tuple[str, ...]:
    if isinstance(trainable, str):
        if trainable in STAGES:
            return STAGES[trainable]
        patterns = tuple(p.strip() for p in trainable.split(",") if p.strip())
        for p in patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"train.trainable: {p!r} is neither a stage ({sorted(STAGES)}) nor a valid regex: {e}")
        return patterns
    return tuple(trainable)


def run_patterns(c: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The trainable-param regexes of ``config.train``: ``trainable``'s, plus every LoRA adapter when
    ``train.lora`` is on (the base weights it adapts stay frozen unless ``trainable`` selects them)."""
    spec = lora.spec_from_config(c.get("lora"))
    return trainable_patterns(c.trainable) + ((lora.ADAPTER_PATTERN,) if spec is not None else ())


def is_trainable(path: tuple[str, ...], patterns) -> bool:
    name = "/".join(path)
    return any(re.search(p, name) for p in patterns)


def partition(params: Any, patterns) -> tuple[dict, dict]:
    """``(trainable, frozen)`` nested dicts with disjoint leaves."""
    flat = traverse_util.flatten_dict(params)
    t = {k: v for k, v in flat.items() if is_trainable(k, patterns)}
    f = {k: v for k, v in flat.items() if not is_trainable(k, patterns)}
    held = sorted("/".join(k) for k, v in t.items() if k[-1] == lora.SCALE or jnp.issubdtype(v.dtype, jnp.integer))
    if held:  # a gradient of an integer kernel is meaningless, and its scale alone would not train the weight
        raise ValueError(f"train.trainable selects {len(held)} kernels that train.lora.quantize holds quantized "
                         f"(e.g. {held[0]}); train them through their adapters, or leave them out of trainable")
    return traverse_util.unflatten_dict(t), traverse_util.unflatten_dict(f)


def merge(trainable: dict, frozen: dict) -> dict:
    flat = traverse_util.flatten_dict(frozen)
    flat.update(traverse_util.flatten_dict(trainable))
    return traverse_util.unflatten_dict(flat)


def learning_rate_schedule(c: ml_collections.ConfigDict) -> Callable:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=c.learning_rate, warmup_steps=max(c.warmup_steps, 1),
        decay_steps=max(c.num_steps, c.warmup_steps + 1), end_value=c.learning_rate * c.end_lr_fraction)


def lr_multiplier(name: str, lr_mults) -> float:
    return next((float(m) for pattern, m in lr_mults if re.search(pattern, name)), 1.0)


def scale_by_path(lr_mults) -> optax.GradientTransformation:
    """Multiplies each update by the ``lr_mults`` factor of its param path (1 where none matches)."""
    lr_mults = tuple((str(p), float(m)) for p, m in lr_mults)
    for pattern, _ in lr_mults:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"train.lr_mults: {pattern!r} is not a valid regex: {e}")

    def update(updates, state, params=None):
        def scale(path, u):
            m = lr_multiplier("/".join(str(getattr(k, "key", k)) for k in path), lr_mults)
            return u if m == 1.0 else u * jnp.asarray(m, u.dtype)

        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# Weight decay by a param's role, read from its leaf name (a stacked layer axis under ``scan_layers`` changes a
# param's ndim, never its name): matmul kernels and embedding tables decay; biases, norm scales and the single
# learned vectors (CLIP's class embedding, LaVi-HD's tile base embedding, anyres' image_newline) do not.
DECAYED = frozenset({"kernel", "embedding", "position_embedding", "temporal_embedding", "tile_row_embedding",
                     "tile_col_embedding"})
NOT_DECAYED = frozenset({"bias", "scale", "class_embedding", "tile_base_embedding", "image_newline"})


def decays(path: tuple, x) -> bool:
    """Whether the param at ``path`` (its keys, innermost last) gets weight decay (see ``DECAYED``)."""
    name = str(getattr(path[-1], "key", path[-1]))
    if name in DECAYED or name in NOT_DECAYED:
        return name in DECAYED
    return x.ndim >= 2  # a name not classified above: matrices decay, vectors do not


def decay_mask(params: Any) -> Any:
    """The tree of booleans (True: weight decay applies) for a param tree; see ``decays``."""
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(c: ml_collections.ConfigDict) -> optax.GradientTransformation:
    parts = [
        optax.clip_by_global_norm(c.clip_grad_norm) if c.clip_grad_norm else optax.identity(),
        optax.adamw(learning_rate_schedule(c), b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=decay_mask),
    ]
    if c.get("lr_mults"):  # appended only when set, so the optimizer state of existing checkpoints keeps its layout
        parts.append(scale_by_path(c.lr_mults))
    return optax.chain(*parts)


def init_opt_state(tx: optax.GradientTransformation, params: Any, patterns) -> Any:
    return tx.init(partition(params, patterns)[0])
