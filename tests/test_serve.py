"""The OpenAI-compatible server on 127.0.0.1, driven by the real openai client (sync, async, streaming) and
lmms-eval's OpenAI model class: answers equal Predictor's alone; bad input gets OpenAI's error bodies."""

import asyncio
import base64
import io
import json
import os
import socket
import threading
import time

import httpx2 as httpx  # the openai client's own HTTP library
import numpy as np
import openai
import pytest
import uvicorn
from PIL import Image

from lavi_jax.predict import Predictor
from lavi_jax.serve.engine import Engine
from lavi_jax.serve.media_fetch import MediaError, MediaFetcher
from lavi_jax.serve.prompt import PromptBuilder
from lavi_jax.serve.server import create_app
from tests.test_serve_engine import make_ckpt

MAX_NEW = 6
PROMPT = "What colour is the circle?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread on 127.0.0.1; ``stop()`` ends it (and the engine, through the app's lifespan)."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            assert self.thread.is_alive()
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(60)


def data_url(path, size=None) -> str:
    image = Image.open(path).convert("RGB")
    if size:
        image = image.resize(size)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module", params=["modulation", pytest.param("concat", marks=pytest.mark.slow)])
def served(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    path, images = make_ckpt(root, request.param)
    p = Predictor(path, max_new_tokens=MAX_NEW)
    builder = PromptBuilder(p.tokenizer, p.processor, p.config)
    engine = Engine(p.model, p.params, p.tokenizer, num_slots=4, max_len=128, buckets=(32, 64, 128),
                    visual_shape=builder.visual_shape, max_waiting=32)
    fetcher = MediaFetcher(os.path.dirname(images[0]))
    server = Server(create_app(engine, builder, fetcher, model_name="lavi-tiny"))
    yield p, engine, server, images, root
    server.stop()
    assert not engine._thread.is_alive()  # the app's shutdown stopped the engine


def ask(image_url, prompt=PROMPT, **kw):
    content = [{"type": "text", "text": prompt}] + ([{"type": "image_url", "image_url": {"url": image_url}}]
                                                    if image_url else [])
    return dict(dict(model="lavi-tiny", messages=[{"role": "user", "content": content}], max_tokens=MAX_NEW,
                     temperature=0), **kw)


def test_openai_client_sync_stream_async(served):
    p, engine, server, images, _ = served
    expected = p.answer(p.inputs(PROMPT, [images[0]]))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    assert [m.id for m in client.models.list().data] == ["lavi-tiny"]
    out = client.chat.completions.create(**ask(data_url(images[0])))
    assert out.choices[0].message.content == expected
    assert out.usage.prompt_tokens == p.inputs(PROMPT, [images[0]])[0].shape[1]
    _, lengths = p.generator(p.params, *p.inputs(PROMPT, [images[0]]))
    assert out.usage.completion_tokens == int(lengths[0])
    local = client.chat.completions.create(**ask(images[0]))  # a path under --allowed-media-root
    assert local.choices[0].message.content == expected
    chunks = list(client.chat.completions.create(**ask(data_url(images[0])), stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == expected
    assert chunks[-1].usage.total_tokens == out.usage.total_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=ask(None, stream=True)) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)

    async def concurrently():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none")
        return await asyncio.gather(*(aclient.chat.completions.create(**ask(data_url(i))) for i in images))

    answers = [r.choices[0].message.content for r in asyncio.run(concurrently())]
    assert answers == [p.answer(p.inputs(PROMPT, [i])) for i in images]


def test_16_concurrent_requests_with_images_of_different_sizes(served, tmp_path):
    p, engine, server, images, _ = served
    cases = []
    for k in range(16):
        path = tmp_path / f"{k}.png"
        Image.open(images[k % 3]).convert("RGB").resize((40 + 9 * k, 90 - 3 * k)).save(path)
        extra = [str(path)] if k % 5 == 4 else []
        cases.append(([str(path)] + extra, PROMPT if k % 2 else "Describe the picture."))
    expected = [p.answer(p.inputs(q, ims)) for ims, q in cases]

    async def all_at_once():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none")
        msgs = [[{"type": "text", "text": q}] + [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in ims]
                for ims, q in cases]
        return await asyncio.gather(*(client.chat.completions.create(
            model="lavi-tiny", messages=[{"role": "user", "content": m}], max_tokens=MAX_NEW, temperature=0)
            for m in msgs))

    assert [r.choices[0].message.content for r in asyncio.run(all_at_once())] == expected
    assert engine.slots.num_traces["step"] == 1  # one decode program whatever the mix in flight


def test_lmms_eval_openai_model_class(served):
    from lmms_eval.models.simple.openai import OpenAICompatible

    p, engine, server, images, _ = served
    lmm = OpenAICompatible(model_version="lavi-tiny", base_url=server.url + "/v1", api_key="none", max_retries=1,
                           num_concurrent=1)
    lmm.task_dict = {"t": {"test": [{"image": Image.open(images[1]).convert("RGB")}]}}

    class Instance:
        args = (PROMPT, {"max_new_tokens": MAX_NEW, "temperature": 0}, lambda doc: [doc["image"]], 0, "t", "test")

    got = lmm.generate_until([Instance()])[0]
    got = getattr(got, "text", got)
    assert got == p.answer(p.inputs(PROMPT, [images[1]]))  # lmms-eval re-encodes the image as PNG: same pixels


BAD = [  # (body or raw bytes, status, param)
    (b"{not json", 400, None),
    ({"model": "lavi-tiny"}, 400, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, 400,
     "messages.0.content.0"),
    (ask("data:image/png;base64," + base64.b64encode(b"not an image at all").decode()), 400, "messages"),
    (ask("data:image/png;base64,%%%not-base64"), 400, "messages"),
    (ask(None, prompt="<image> <image> <image>"), 400, "messages"),
    (ask(None, prompt="long " * 100), 400, "messages"),
    (ask(None, max_tokens=0), 400, "max_tokens"),
    (ask(None, max_tokens=10**9), 400, "max_tokens"),
    (ask(None, model="gpt-4o"), 404, "model"),
    (ask("/etc/passwd"), 400, "messages"),
    (ask("http://169.254.169.254/latest/meta-data"), 400, "messages"),
]


def test_bad_input_gets_openai_errors_and_others_are_unaffected(served):
    p, engine, server, images, _ = served
    too_many = ask(data_url(images[0]))
    too_many["messages"][0]["content"] *= 3  # 3 images, the model takes 2
    cases = BAD + [(too_many, 400, "messages")]
    good = ask(data_url(images[2]))
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for body, status, param in cases:
            kw = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = http.post("/v1/chat/completions", headers={"content-type": "application/json"}, **kw)
            assert r.status_code == status, (body if isinstance(body, bytes) else json.dumps(body)[:200], r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param
        assert http.post("/v1/chat/completions", json=good).json()["choices"][0]["message"]["content"] == \
            p.answer(p.inputs(PROMPT, [images[2]]))
        assert http.get("/health").json() == {"status": "ok"}
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**ask(None, max_tokens=0))


def test_disconnect_frees_slot_and_metrics(served):
    p, engine, server, images, _ = served
    long = None
    for q in ("Tell me everything.", "Describe it.", PROMPT, "Count the shapes.", "Why?"):  # greedy: deterministic
        r = engine.generate(engine_request(p, q, 60), 120)
        if r.finish_reason == "length":
            long = q
            break
    assert long is not None
    before, made = engine.stats().get("finished_cancelled", 0), engine.stats()["generation_tokens"]
    with httpx.stream("POST", server.url + "/v1/chat/completions",
                      json=ask(None, prompt=long, max_tokens=60, stream=True), timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = r.iter_lines()  # kept: a dropped iterator closes the response
        next(lines)  # the role chunk
        deadline = time.time() + 60
        while engine.stats()["generation_tokens"] < made + 2:  # mid-answer
            assert time.time() < deadline, f"{engine.stats()} {made} {long}"
            time.sleep(0.001)
    deadline = time.time() + 30
    while engine.stats().get("finished_cancelled", 0) == before and time.time() < deadline:
        time.sleep(0.05)
    assert engine.stats()["finished_cancelled"] == before + 1 and engine.stats()["running"] == 0
    text = httpx.get(server.url + "/metrics").text
    for name in ("lavi:num_requests_running 0.0", "lavi:num_requests_waiting 0.0", "lavi:num_slots 4.0",
                 "lavi:time_to_first_token_seconds_bucket", "lavi:e2e_request_latency_seconds_count",
                 'lavi:request_success_total{finished_reason="cancelled"}', "lavi:generation_tokens_total"):
        assert name in text, name


def engine_request(p, prompt, max_tokens):
    from lavi_jax.serve.engine import Request

    return Request(p.inputs(prompt)[0][0], max_tokens=max_tokens)


def test_full_queue_answers_429(served):
    p, engine, server, images, _ = served
    idle = Engine(p.model, p.params, p.tokenizer, num_slots=1, max_len=128, buckets=(32, 64, 128), max_waiting=1)
    idle._thread = threading.Thread()  # never started: requests stay queued
    second = Server(create_app(idle, PromptBuilder(p.tokenizer, p.processor, p.config), MediaFetcher(),
                               model_name="lavi-tiny"))
    idle.stop = lambda timeout=None: None

    async def two():
        async with httpx.AsyncClient(base_url=second.url, timeout=30) as http:
            first = asyncio.create_task(http.post("/v1/chat/completions", json=ask(None)))
            while idle.stats()["waiting"] == 0:
                await asyncio.sleep(0.02)
            r = await http.post("/v1/chat/completions", json=ask(None))
            first.cancel()
            return r

    r = asyncio.run(two())
    second.stop()
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"


def test_media_fetcher_refuses_private_addresses_and_other_domains(tmp_path):
    public = lambda host, port, type=0: [(2, 1, 6, "", ("93.184.216.34", port))]
    private = lambda host, port, type=0: [(2, 1, 6, "", ("10.0.0.7", port))]
    assert MediaFetcher(allowed_domains=["example.com"], resolve=public).check_url("https://img.example.com/a.png") \
        is None
    for fetcher, url in [(MediaFetcher(allowed_domains=["example.com"], resolve=private), "http://example.com/a"),
                         (MediaFetcher(allowed_domains=["127.0.0.1"]), "http://127.0.0.1:9/a.png"),
                         (MediaFetcher(allowed_domains=["169.254.169.254"]), "http://169.254.169.254/latest"),
                         (MediaFetcher(allowed_domains=["localhost"]), "http://localhost/a.png"),
                         (MediaFetcher(allowed_domains=["example.com"], resolve=public), "http://evil.com/a.png"),
                         (MediaFetcher(allowed_domains=["example.com"], resolve=public), "http://example.com.evil/a")]:
        with pytest.raises(MediaError):
            fetcher.fetch(url)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"x")
    (tmp_path / "in" / "link.png").symlink_to(tmp_path / "out.png")
    (tmp_path / "out.png").write_bytes(b"x")
    fetcher = MediaFetcher(str(tmp_path / "in"))
    assert fetcher.item("image", str(tmp_path / "in" / "a.png"))[1] == str(tmp_path / "in" / "a.png")
    for path in (str(tmp_path / "out.png"), str(tmp_path / "in" / "link.png"), str(tmp_path / "in" / ".." / "out.png")):
        with pytest.raises(MediaError):
            fetcher.item("image", path)


@pytest.mark.slow
def test_cli_serves_and_sigterm_drains(tmp_path):
    import signal
    import subprocess
    import sys

    path, images = make_ckpt(tmp_path, "modulation")
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen([sys.executable, "-m", "lavi_jax.serve", "--ckpt", path, "--port", str(port),
                             "--slots", "2", "--max-len", "128", "--buckets", "32,64,128",
                             "--served-model-name", "lavi-tiny"], env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            stderr=open(tmp_path / "server.err", "w"))
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 240
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None and time.time() < deadline, (tmp_path / "server.err").read_text()[-2000:]
                time.sleep(0.5)
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=120,
                          json=ask(data_url(images[0]), max_tokens=40, stream=True)) as r:
            lines = r.iter_lines()
            first = next(lines)
            proc.send_signal(signal.SIGTERM)  # mid-stream: the answer still ends, then the server exits
            rest = [line for line in lines if line]
        assert first.startswith("data: ") and rest[-1] == "data: [DONE]"
        assert proc.wait(60) == -signal.SIGTERM  # uvicorn re-raises the signal once it shut down gracefully
    finally:
        if proc.poll() is None:
            proc.kill()
