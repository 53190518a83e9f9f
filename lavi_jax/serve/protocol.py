"""The OpenAI chat-completions wire format: request validation, responses, stream chunks and error bodies.

    chat = parse_chat(body, model_name)   # raises APIError (status, OpenAI error body) for bad input
    chat.messages: [(role, text, number of media parts)], chat.media: [(kind, url)], chat.knobs: engine knobs

Content parts: ``{"type": "text", "text"}``, ``{"type": "image_url", "image_url": {"url"}}`` (or the url
as a string) and ``{"type": "video_url", "video_url": {"url"}}``. Defaults follow OpenAI's:
``temperature`` 1, ``top_p`` 1; ``top_k`` (0: off) and ``seed`` are accepted as vLLM accepts them.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

MAX_STOP = 4


class APIError(Exception):
    """An error answered with OpenAI's body ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class ChatRequest:
    model: str
    messages: list  # (role, text, media count)
    media: list  # (kind "image" | "video", url)
    knobs: dict  # Request fields: max_tokens, temperature, top_k, top_p, seed, stop
    stream: bool = False
    include_usage: bool = False


def _number(body, name, kind, default, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise APIError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise APIError(400, f"'{name}' must be between {low} and {high}, got {value}", name)
    return kind(value)


def _content(content, i: int) -> tuple[str, list]:
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise APIError(400, f"messages[{i}].content must be a string or a list of parts", f"messages.{i}.content")
    texts, media = [], []
    for j, part in enumerate(content):
        where = f"messages.{i}.content.{j}"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "video_url"):
            ref = part.get(kind)
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise APIError(400, f"{where}.{kind}.url must be a non-empty string", where)
            media.append(("image" if kind == "image_url" else "video", url))
        else:
            raise APIError(400, f"unsupported content part {kind!r} (text, image_url, video_url)", where)
    return "\n".join(texts), media


def parse_chat(body: Any, model_name: str) -> ChatRequest:
    """Validates a ``POST /v1/chat/completions`` body."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model", model_name)
    if model != model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {model_name!r}", "model",
                       "model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' is required: a non-empty list", "messages")
    turns, media = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}] needs a role of system, user or assistant", f"messages.{i}.role")
        text, parts = _content(m.get("content"), i)
        turns.append((m["role"], text, len(parts)))
        media.extend(parts)
    if body.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported", "n")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings", "stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise APIError(400, f"'{param}' must be a positive integer, got {max_tokens!r}", param)
    knobs = dict(max_tokens=max_tokens, stop=stop,
                 temperature=_number(body, "temperature", float, 1.0, 0.0, 2.0),
                 top_p=_number(body, "top_p", float, 1.0, 0.0, 1.0),
                 top_k=max(_number(body, "top_k", int, 0, -1, 1 << 20), 0),
                 seed=_number(body, "seed", int, None, 0, 2**31 - 1))
    if knobs["top_p"] <= 0:
        raise APIError(400, "'top_p' must be above 0", "top_p")
    options = body.get("stream_options") or {}
    return ChatRequest(model, turns, media, knobs, bool(body.get("stream", False)),
                       bool(isinstance(options, dict) and options.get("include_usage")))


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def response(cid: str, model: str, text: str, finish: str, prompt: int, completion: int) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                         "logprobs": None}],
            "usage": usage(prompt, completion)}


def chunk(cid: str, model: str, delta: dict, finish: str | None = None, usage_: dict | None = None) -> dict:
    out = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if delta is not None
           else []}
    if usage_ is not None:
        out["usage"] = usage_
    return out
