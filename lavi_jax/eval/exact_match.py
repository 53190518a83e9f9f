"""Held-out exact match on ``config.data.eval_json``: every assistant token is the model's argmax.

Teacher-forced, so it equals exact match under greedy decoding with the
end-of-turn token as stop, at the cost of one forward per batch. Every process
feeds its own records (``make_eval_iterator``); the answers are gathered on
every process.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from lavi_jax import sharding
from lavi_jax.data.batch import BatchSpec
from lavi_jax.data.pipeline import make_eval_iterator


def exact_match_scorer(model):
    """``correct(params, batch) -> [B] bool``, jitted: every target token is the argmax."""

    @jax.jit
    def correct(params, batch):
        logits = model.apply({"params": params}, batch["input_ids"], batch.get("pixel_values"), batch.get("item_mask"),
                             attention_mask=batch["attention_mask"], image_sizes=batch.get("image_sizes"))
        hit = jnp.argmax(logits[:, :-1], -1) == batch["input_ids"][:, 1:]
        need = batch["loss_mask"][:, 1:] > 0
        return jnp.all(hit | ~need, axis=1) & jnp.any(need, axis=1)

    return correct


def evaluate_exact_match(config, model, params, mesh, tokenizer, processor, *,
                         scorer=None) -> tuple[dict[str, float | int], dict[int, bool]]:
    """``(scores, correct)`` on ``config.data.eval_json``.

    ``scores``: ``exact_match`` (fraction of usable records answered exactly),
    ``eval_examples`` and ``eval_bad_records`` (skipped, counted on this
    process). ``correct``: record index (position in the file) -> bool. Pass the
    same ``scorer`` (:func:`exact_match_scorer`) to repeated calls to compile once.
    """
    batch_size = config.evals.get("batch_size") or config.train.batch_size
    local_bs = max(batch_size // jax.process_count(), 1)
    it = make_eval_iterator(config.data, tokenizer, processor, batch_size=local_bs)
    keys = BatchSpec.from_config(config, local_bs, packed=False).keys()  # eval batches are never packed
    correct_fn = scorer or exact_match_scorer(model)
    indices, oks = [], []
    with sharding.use_mesh(mesh):
        for batch in it:
            ok = correct_fn(params, sharding.to_global({k: batch[k] for k in keys}, mesh))
            oks.append(multihost_utils.process_allgather(ok, tiled=True))
            idx = np.where(batch["valid"], batch["index"], -1)
            indices.append(multihost_utils.process_allgather(idx, tiled=True))
    idx, ok = np.concatenate(indices), np.concatenate(oks)
    keep = idx >= 0
    idx, ok = idx[keep], ok[keep]
    scores = {"exact_match": float(ok.mean()) if len(ok) else 0.0, "eval_examples": int(len(ok)),
              "eval_bad_records": int(it.bad_records.count)}
    return scores, {int(i): bool(o) for i, o in zip(idx, ok)}
