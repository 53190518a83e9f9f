"""A training config small enough for tests: the demo's structure at toy width, on a given LLaVA-format set."""

import jax
from flax import traverse_util

import lavi_jax


def small_config(vqa, **train):
    config = lavi_jax.configs.get("configs/demo.py")
    config.model.llm.update(hidden_size=32, intermediate_size=64, num_layers=2, head_dim=8)
    config.model.vision.update(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, image_size=32, patch_size=8)
    config.model.projector.pool = 1
    config.model.conditioner.update(width=16, num_heads=2)
    config.data.update(train_json=vqa["train_json"], eval_json=vqa["eval_json"], image_root=vqa["image_root"],
                       num_threads=1, image_size=32)
    config.train.update(dict(dict(num_steps=6, batch_size=8, log_every=1, checkpoint_every=3, warmup_steps=2), **train))
    config.mesh.update(data=2, fsdp=2, tensor=2)
    return config


def perturb(params, seed=1, scale=0.1):
    """Non-zero projector (tile and temporal embeddings included) and conditioner output projections: images change the logits."""
    flat = traverse_util.flatten_dict(params)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    hit = lambda k: k[0] == "projector" or (any("conditioner" in p for p in k) and "o_proj" in k)
    out = {k: (v + scale * jax.random.normal(r, v.shape, v.dtype) if hit(k) else v) for (k, v), r in zip(flat.items(), keys)}
    return traverse_util.unflatten_dict(out)
