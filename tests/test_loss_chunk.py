"""``train.loss_chunk``: the LM head and cross-entropy over chunks of positions give the whole-row loss and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lavi_jax
from lavi_jax import lora
from lavi_jax.train.step import loss_terms
from tests.small import perturb, small_config
from tests.test_lora_train import tiny_batch


SLOW = pytest.mark.slow  # ~30 s each on 2 cores


@pytest.mark.parametrize("fusion,tied,lora_on", [("modulation", False, False),
                                                 pytest.param("concat", True, False, marks=SLOW),
                                                 pytest.param("modulation", False, True, marks=SLOW)])
def test_chunked_loss_and_gradients_equal_the_whole_row(fusion, tied, lora_on):
    config = small_config({"train_json": "unused", "eval_json": "", "image_root": ""})
    config.model.fusion = fusion
    config.model.llm.tie_word_embeddings = tied
    spec = None
    if lora_on:  # adapters on the LM head as well: the chunked head runs them too
        config.train.lora.update(rank=2, alpha=4.0, targets=r"llm/layers_\d+/self_attn/q_proj,^llm/lm_head$")
        spec = lavi_jax.checkpoint.lora_spec(config)
    model = lora.wrap(lavi_jax.LaVi(config.model), spec)
    batch = {k: jnp.asarray(v) for k, v in tiny_batch(config, B=3, T=16).items() if k not in ("positions", "segment_ids")}
    params = perturb(nn.unbox(model.init(jax.random.key(0), batch["input_ids"], batch["pixel_values"],
                                         batch["item_mask"])["params"]))
    if lora_on:  # non-zero B matrices, so the adapters change the logits
        params = jax.tree_util.tree_map_with_path(
            lambda p, v: v + 0.1 if getattr(p[-1], "key", None) == "lora_b" else v, params)

    def value_and_grad(chunk):
        f = lambda p: loss_terms(model, p, batch, chunk=chunk)
        return jax.jit(jax.value_and_grad(lambda p: f(p)[0]))(params), jax.jit(f)(params)[1]

    (want, g_want), n_want = value_and_grad(0)
    for chunk in (4, 64):  # 15 target positions: 4 chunks (the last padded), one padded chunk
        (got, g_got), n_got = value_and_grad(chunk)
        assert float(n_got) == float(n_want) > 0
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
        scale = max(float(jnp.abs(b).max()) for b in jax.tree.leaves(g_want))  # float32 sums in another order
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_got), jax.tree.leaves(g_want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 * scale,
                                       err_msg=jax.tree_util.keystr(path))
