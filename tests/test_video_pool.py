"""``projector.video_pool``: video frames pooled as LLaVA-OneVision pools them, in the full forward and in cached decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lavi_jax
from lavi_jax import sharding
from lavi_jax.generate import Generator
from lavi_jax.models.projector import resize_frames, tokens_per_frame
from test_generate import assert_greedy, full_forward, prompts
from test_lavi import tiny


@pytest.mark.parametrize("side,out", [(27, 14), (5, 3), (4, 2)])
def test_resize_equals_torch_bilinear_interpolate(side, out):
    x = np.random.default_rng(0).normal(size=(2, 3, side * side, 6)).astype(np.float32)
    got = np.asarray(resize_frames(jnp.asarray(x), side, out))
    t = torch.from_numpy(x.reshape(6, side, side, 6)).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(t, size=(out, out), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).reshape(2, 3, out * out, 6).numpy(), atol=1e-5)


def random_params(model, ids):
    shapes, _ = sharding.abstract_params(model, jnp.asarray(ids))
    rng = np.random.default_rng(0)
    fill = lambda s: jnp.asarray((0.02 if len(s.shape) < 2 else float(np.prod(s.shape[:-1])) ** -0.5)
                                 * rng.normal(size=s.shape) + (1.0 if len(s.shape) == 1 else 0.0), s.dtype)
    return jax.tree.map(fill, shapes)


def test_pooled_video_decodes_as_its_full_forward_with_a_quarter_of_the_visual_cache():
    frames = 3
    cfg = tiny(**{"vision.image_size": 40, "projector.video_pool": 2})  # a 5x5 grid per frame -> 3x3
    plain = tiny(**{"vision.image_size": 40})
    assert tokens_per_frame(cfg, frames) == 9 and tokens_per_frame(cfg) == tokens_per_frame(plain, frames) == 25
    ids, mask, pix, item_mask = prompts(cfg, frames)
    model = lavi_jax.LaVi(cfg)
    params = random_params(model, ids)
    gen = Generator(model, max_new_tokens=6, buckets=(16,))
    state = gen.prefill(params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pix), jnp.asarray(item_mask))
    state_plain = Generator(lavi_jax.LaVi(plain), max_new_tokens=6, buckets=(16,)).prefill(
        params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pix), jnp.asarray(item_mask))
    shapes = lambda s: sorted(x.shape for x in jax.tree.leaves(s["visual_cache"]))
    S, S_plain = 2 * frames * 9, 2 * frames * 25  # visual keys per row: 2 items x 3 frames x pooled / full grid
    kv = [x for x in shapes(state) if S in x]
    assert kv and [tuple(S_plain if d == S else d for d in x) for x in kv] == [x for x in shapes(state_plain) if S_plain in x]
    assert not any(S_plain in x for x in shapes(state))
    tokens, lengths = gen(params, ids, mask, pix, item_mask)
    tokens = np.asarray(tokens)
    logits, T = full_forward(model, params, (ids, mask, pix, item_mask), tokens)
    assert_greedy(logits, T, tokens)
    logits_plain, _ = full_forward(lavi_jax.LaVi(plain), params, (ids, mask, pix, item_mask), tokens)
    assert np.abs(logits - logits_plain).max() > 1e-3  # pooling changes what the conditioners see


def test_video_pool_refuses_models_where_frames_are_not_videos():
    for over in ({"fusion": "concat"}, {"anyres.enabled": True}):
        cfg = tiny(**{"projector.video_pool": 2, **over})
        with pytest.raises(ValueError, match="video_pool=2 pools items of several frames"):
            lavi_jax.LaVi(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
