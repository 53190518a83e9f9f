"""python -m lavi_jax.predict: one question on a tiny random checkpoint, streamed, equal to Generator's answer."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lavi_jax import checkpoint
from lavi_jax.demo.synthetic import write_synthetic_vqa
from lavi_jax.generate import GenerationConfig
from lavi_jax.predict import Predictor
from tests.test_eval import random_params, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "What colour is the circle?"
MAX_NEW = 6


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    paths = write_synthetic_vqa(str(root / "data"), num_train=1, num_eval=2, image_size=64)
    config = tiny_config(paths)
    image = os.path.join(paths["image_root"], json.load(open(paths["eval_json"]))[0]["image"])
    return checkpoint.save_params(str(root / "ckpt"), config, random_params(config)), image


def cli(*args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "lavi_jax.predict", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_cli_prints_the_generator_answer(ckpt):
    path, image = ckpt
    out = cli("--ckpt", path, "--image", image, "--prompt", PROMPT, "--max_new_tokens", str(MAX_NEW))
    assert out.returncode == 0, out.stderr[-3000:]
    printed = out.stdout.strip()
    assert printed

    predictor = Predictor(path, max_new_tokens=MAX_NEW)
    inputs = predictor.inputs(PROMPT, [image])
    tokens, lengths = predictor.generator(predictor.params, *inputs)
    expected = predictor.tokenizer.decode(np.asarray(tokens)[0, :int(lengths[0])]).strip()
    assert printed == expected == predictor.answer(inputs)
    pieces = list(predictor.stream(inputs))
    assert len(pieces) > 1 and "".join(pieces).strip() == expected  # streamed token by token

    sampled = cli("--ckpt", path, "--image", image, "--image", image, "--prompt", PROMPT, "--temperature", "1.5",
                  "--top_k", "20", "--top_p", "0.9", "--seed", "3", "--max_new_tokens", str(MAX_NEW))
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    again = predictor.answer(predictor.inputs(PROMPT, [image, image]),
                             GenerationConfig(temperature=1.5, top_k=20, top_p=0.9), seed=3)
    assert sampled.stdout.strip() == again


def test_stream_equals_decode_when_sampling(ckpt):
    """Generator.stream yields decode's tokens step by step, sampled rows included."""
    path, image = ckpt
    predictor = Predictor(path, max_new_tokens=MAX_NEW)
    ids, mask, pix, item_mask = predictor.inputs(PROMPT, [image])
    batch = [np.repeat(x, 3, 0) for x in (ids, mask, pix, item_mask)]
    sampling, gen, params = GenerationConfig(temperature=2.0, top_k=50), predictor.generator, predictor.params
    tokens, lengths = gen(params, *batch, sampling=sampling, rng=jax.random.key(7))
    steps = np.stack(list(gen.stream(params, gen.prefill(params, *batch), sampling=sampling, rng=jax.random.key(7))), 1)
    np.testing.assert_array_equal(steps, np.asarray(tokens)[:, :steps.shape[1]])
    assert steps.shape[1] == MAX_NEW or (np.asarray(tokens)[:, steps.shape[1]:] == gen.pad_id).all()
