"""The continuous-batching engine: greedy answers equal Predictor's alone, whatever else is in flight."""

import json
import os
import time

import numpy as np
import pytest

from lavi_jax import checkpoint
from lavi_jax.data.media import IMAGE
from lavi_jax.demo.synthetic import write_synthetic_vqa
from lavi_jax.generate import GenerationConfig
from lavi_jax.predict import Predictor
from lavi_jax.serve.engine import Engine, QueueFull, Request, RequestError
from lavi_jax.serve.prompt import PromptBuilder
from tests.test_eval import random_params, tiny_config

MAX_NEW = 6
PROMPTS = ("What colour is the circle?", "Describe it.", "Is there a square in the image, and where is it?")


def make_ckpt(root, fusion, max_images=2):
    paths = write_synthetic_vqa(str(root / "data"), num_train=1, num_eval=3, image_size=64)
    config = tiny_config(paths)
    config.model.fusion = fusion
    config.data.max_images = max_images
    images = [os.path.join(paths["image_root"], s["image"]) for s in json.load(open(paths["eval_json"]))]
    return checkpoint.save_params(str(root / fusion), config, random_params(config)), images


def make_engine(p: Predictor, **kw):
    builder = PromptBuilder(p.tokenizer, p.processor, p.config)
    kw = dict(dict(num_slots=4, max_len=128, buckets=(32, 64, 128), visual_shape=builder.visual_shape), **kw)
    return Engine(p.model, p.params, p.tokenizer, **kw), builder


@pytest.fixture(scope="module", params=["modulation", pytest.param("concat", marks=pytest.mark.slow)])
def setup(request, tmp_path_factory):
    path, images = make_ckpt(tmp_path_factory.mktemp(request.param), request.param)
    p = Predictor(path, max_new_tokens=MAX_NEW)
    engine, builder = make_engine(p)
    yield p, engine.start(), builder, images
    engine.stop()


def cases(images):
    return [(PROMPTS[0], [images[0]]), (PROMPTS[1], []), (PROMPTS[2], [images[1], images[2]]),
            (PROMPTS[0], [images[2]]), (PROMPTS[1], [images[1]])]


@pytest.mark.slow  # tests/test_serve.py checks the same through the server in the default run
def test_concurrent_greedy_equals_predictor_alone(setup):
    p, engine, builder, images = setup
    expected = [p.answer(p.inputs(q, ims)) for q, ims in cases(images)]
    reqs = [engine.submit(builder.request([("user", q, len(ims))], [(IMAGE, i) for i in ims], max_tokens=MAX_NEW))
            for q, ims in cases(images)]  # 5 requests, 4 slots: one waits and enters as a slot frees
    for r in reqs:
        assert r.done.wait(120)
    assert [r.text.strip() for r in reqs] == expected
    assert all(r.finish_reason in ("stop", "length") for r in reqs)
    assert engine.slots.num_traces["step"] == 1


def test_sampled_answer_equals_predictor_with_its_seed(setup):
    p, engine, builder, images = setup
    knobs = GenerationConfig(temperature=1.5, top_k=20, top_p=0.9)
    expected = p.answer(p.inputs(PROMPTS[0], [images[0]]), knobs, seed=3)
    req = builder.request([("user", PROMPTS[0], 1)], [(IMAGE, images[0])], max_tokens=MAX_NEW, temperature=1.5,
                          top_k=20, top_p=0.9, seed=3)
    other = builder.request([("user", PROMPTS[1], 0)], [], max_tokens=MAX_NEW)
    engine.submit(other)
    assert engine.generate(req, 120).text.strip() == expected


def test_stop_string_and_refusals(setup):
    p, engine, builder, images = setup
    # Stop strings are matched on the host, the same for every fusion; they are checked where the random model
    # writes text (the random concat model answers nothing), the refusals for both fusions.
    if engine.slots.fusion == "modulation":
        asked = [([("user", q, 1)], [(IMAGE, i)]) for q in PROMPTS for i in images]
        done = [engine.submit(builder.request(*a, max_tokens=MAX_NEW)) for a in asked]
        assert all(r.done.wait(120) for r in done)
        longest = max(range(len(done)), key=lambda k: len(done[k].text))
        full = done[longest].text
        assert full
        at = next((i for i in range(1, len(full)) if full.find(full[i]) == i), 0)  # a character's first occurrence
        stopped = engine.generate(builder.request(*asked[longest], max_tokens=MAX_NEW, stop=["\x00no", full[at]]),
                                  120)
        assert stopped.text == full[:at] and stopped.finish_reason == "stop"
    with pytest.raises(RequestError, match="longest bucket"):
        engine.check(Request(np.ones(200, np.int32)))
    with pytest.raises(RequestError, match="max_tokens"):
        engine.check(Request(np.ones(10, np.int32), max_tokens=0))
    with pytest.raises(RequestError, match="more than"):
        builder.request([("user", "x", 3)], [(IMAGE, images[0])] * 3)


def test_queue_full_and_cancel(setup):
    p, engine, builder, images = setup
    small, _ = make_engine(p, num_slots=1, max_waiting=1)  # not started: nothing leaves the queue
    small.submit(Request(np.ones(4, np.int32), max_tokens=2))
    with pytest.raises(QueueFull):
        small.submit(Request(np.ones(4, np.int32), max_tokens=2))
    req = builder.request([("user", PROMPTS[2], 0)], [], max_tokens=50)
    engine.submit(req)
    while len(req.tokens) < 2 and not req.done.is_set():
        time.sleep(0.001)
    req.cancel()
    assert req.done.wait(120) and req.finish_reason == "cancelled" and len(req.tokens) < 50
    assert engine.stats()["running"] == 0


def test_slot_state_sharded_on_the_params_mesh():
    """Abstract state on a data x tensor mesh: KV cache slots over the batch axes and KV heads over tensor; the
    visual keys / values of every slot split the same way (slots over batch, conditioner heads over tensor)."""
    import jax
    import jax.numpy as jnp

    import lavi_jax
    from lavi_jax import sharding
    from lavi_jax.serve.slots import Slots
    from test_lavi import tiny

    cfg = tiny(**{"llm.num_kv_heads": 2, "conditioner.num_heads": 2})
    model = lavi_jax.LaVi(cfg)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, devices=jax.devices()[:4])
    shapes, specs = sharding.abstract_params(model, jnp.zeros((1, 8), jnp.int32))
    params = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), shapes,
                          sharding.logical_to_sharding(specs, mesh, shapes, uneven=None))
    s = cfg.vision.image_size
    cache, mask, visual = Slots(model, num_slots=4, max_len=32, pad_id=0, visual_shape=(2, 1, s, s)).state_shapes(params)
    assert cache["k"].sharding.spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"), None, "tensor", None)
    kv = [x for x in jax.tree.leaves(visual) if x.ndim >= 4]
    assert kv and all(x.sharding.spec[x.ndim - 4] == ("data", "fsdp") and x.sharding.spec[x.ndim - 2] == "tensor"
                      for x in kv), [x.sharding.spec for x in kv]
    assert all(x.sharding.spec[0 if x.ndim < 4 else x.ndim - 4] == ("data", "fsdp") for x in jax.tree.leaves(visual))
