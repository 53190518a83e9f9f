"""Continuous batching: requests enter free decode slots between steps; every step decodes every live slot.

    engine = Engine(model, params, tokenizer, num_slots=8, max_len=1024, visual_shape=(N, F, H, W))
    engine.start()
    req = engine.submit(Request(ids, pixel_values, item_mask, image_sizes, max_tokens=64, stop=["\\n\\n"]),
                        on_event=callback)      # callback(Event) from the engine thread
    ...
    engine.stop()                                # finishes the requests in flight, then returns

A request's prompt is left-padded to a bucket (``buckets``; longer prompts are refused), prefilled alone
(batch 1) and written into a free slot; its first token comes from the prefill (time to first token).
Each step feeds every live slot its last token at its own cache index and samples the next one with the
slot's own knobs (``temperature`` 0: greedy; ``top_k``, ``top_p``, ``seed``). A request ends at a stop
token, at one of its ``stop`` strings (the text before it is the answer), after ``max_tokens`` tokens, or
when cancelled (a client that went away); its slot is free for the next request at once. Greedy answers
are token for token what :class:`lavi_jax.generate.Generator` gives the request alone.

At most ``max_waiting`` requests wait for a slot; ``submit`` raises :class:`QueueFull` beyond that.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import random
import threading
import time
from typing import Callable, Optional, Sequence

import numpy as np

from lavi_jax import sharding
from lavi_jax.data.batch import bucket_length
from lavi_jax.generate import DEFAULT_BUCKETS
from lavi_jax.serve.slots import Slots


class QueueFull(RuntimeError):
    """More requests wait for a slot than the engine keeps."""


class RequestError(ValueError):
    """A request the engine cannot run (prompt past the longest bucket, no room for max_tokens, ...)."""


@dataclasses.dataclass
class Request:
    """One prompt: ids [T] int32; pixel_values [N, F, H, W, 3] float32, item_mask [N, F] bool and (anyres)
    image_sizes [N, 2] int32, or None for text."""

    ids: np.ndarray
    pixel_values: Optional[np.ndarray] = None
    item_mask: Optional[np.ndarray] = None
    image_sizes: Optional[np.ndarray] = None
    max_tokens: Optional[int] = None  # None: as many as the slot holds
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: Sequence[str] = ()
    # set by the engine
    tokens: list = dataclasses.field(default_factory=list)
    text: str = ""  # the answer so far, as sent (stop strings and unfinished characters held back)
    finish_reason: Optional[str] = None
    cancelled: bool = False
    submitted: float = 0.0
    first_token_at: Optional[float] = None
    finished_at: Optional[float] = None
    prefix_length: int = 0
    on_event: Optional[Callable] = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def prompt_tokens(self) -> int:
        return int(len(self.ids))

    def cancel(self) -> None:
        """Frees the request's slot at the engine's next step (or drops it from the queue)."""
        self.cancelled = True


@dataclasses.dataclass(frozen=True)
class Event:
    """Text the request produced since the last event; ``finish_reason`` ("stop", "length", "cancelled",
    "error") on its last event."""

    request: Request
    delta: str
    finish_reason: Optional[str] = None
    error: Optional[str] = None


class Engine:
    """The scheduler thread over :class:`Slots`. ``stats()`` has the counters ``metrics`` exports."""

    def __init__(self, model, params, tokenizer, *, num_slots: int = 8, max_len: int = 1024,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, visual_shape: tuple | None = None, anyres: bool = False,
                 max_waiting: int = 256, max_tokens_default: int = 256, mesh=None):
        self.params, self.tokenizer, self.mesh = params, tokenizer, mesh
        self.buckets = tuple(b for b in buckets if b <= max_len) or (max_len,)
        self.slots = Slots(model, num_slots=num_slots, max_len=max_len, pad_id=tokenizer.pad_id,
                           visual_shape=visual_shape, anyres=anyres)
        self.max_len, self.max_waiting, self.max_tokens_default = int(max_len), int(max_waiting), max_tokens_default
        self.stop_ids = set(int(s) for s in tokenizer.stop_ids)
        self._waiting: collections.deque = collections.deque()
        self._live: list[Optional[Request]] = [None] * num_slots
        self._host = {k: np.zeros(num_slots, d) for k, d in
                      (("tok", np.int32), ("index", np.int32), ("position", np.int32), ("seed", np.uint32),
                       ("step", np.int32), ("temperature", np.float32), ("top_k", np.int32), ("top_p", np.float32))}
        self._wake = threading.Condition()
        self._accepting, self._stopping = True, False
        self._thread: Optional[threading.Thread] = None
        self.counters = collections.Counter()
        self.history: collections.deque = collections.deque(maxlen=4096)  # (time, tokens) of recent steps
        self.error: Optional[str] = None

    # -- client side

    def check(self, request: Request) -> None:
        """Raises :class:`RequestError` for a request that cannot run; sets its prefix length and max_tokens."""
        T = len(request.ids)
        if T > self.buckets[-1]:
            raise RequestError(f"the prompt is {T} tokens, past the longest bucket of {self.buckets[-1]}")
        bucket = bucket_length(T, self.buckets, beyond="multiple")
        if self.slots.visual_shape is not None and request.item_mask is not None:
            N, F = self.slots.visual_shape[:2]
            n, f = request.item_mask.shape[0], int(request.item_mask.sum(1).max(initial=0))
            if n > N or f > F:
                raise RequestError(f"{n} items of {f} frames, more than the engine's {N} of {F}")
        mask = None if request.pixel_values is None or self.slots.fusion != "concat" else request.item_mask
        request.prefix_length = self.slots.prefix_length(bucket, mask, request.image_sizes)
        room = self.max_len - request.prefix_length + 1
        if room < 1:
            raise RequestError(f"the prompt takes {request.prefix_length} of the {self.max_len} cache positions")
        if request.max_tokens is None:
            request.max_tokens = min(self.max_tokens_default, room)
        if request.max_tokens < 1 or request.max_tokens > room:
            raise RequestError(f"max_tokens must be between 1 and {room} for this prompt, got {request.max_tokens}")

    def submit(self, request: Request, on_event: Callable | None = None) -> Request:
        """Queues a request (``check`` first); raises QueueFull, RequestError, or RuntimeError when stopping."""
        self.check(request)
        request.on_event, request.submitted = on_event, time.perf_counter()
        if request.seed is None:
            request.seed = random.getrandbits(31)
        with self._wake:
            if not self._accepting:
                raise RuntimeError("the server is shutting down")
            if len(self._waiting) >= self.max_waiting:
                self.counters["rejected"] += 1
                raise QueueFull(f"{len(self._waiting)} requests are waiting, the most this server queues")
            self._waiting.append(request)
            self._wake.notify()
        return request

    def generate(self, request: Request, timeout: float | None = None) -> Request:
        """Submits and waits: the finished request (``text``, ``tokens``, ``finish_reason``)."""
        self.submit(request)
        request.done.wait(timeout)
        return request

    def stats(self) -> dict:
        with self._wake:
            return {"running": sum(r is not None for r in self._live), "waiting": len(self._waiting),
                    "slots": len(self._live), **self.counters}

    # -- lifecycle

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="lavi-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Refuses new requests, finishes the waiting and running ones, then ends the engine thread."""
        with self._wake:
            self._accepting, self._stopping = False, True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the engine thread

    def _loop(self) -> None:
        with sharding.use_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            self._run()

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._waiting and not any(self._live) and not self._stopping:
                        self._wake.wait()
                    if self._stopping and not self._waiting and not any(self._live):
                        return
                self._admit()
                if any(r is not None for r in self._live):
                    self._step()
        except Exception as e:  # the device failed: every request in flight ends with the error
            self.error = f"{type(e).__name__}: {e}"
            with self._wake:
                pending = [r for r in self._live if r is not None] + list(self._waiting)
                self._waiting.clear()
                self._live = [None] * len(self._live)
                self._accepting = False
            for r in pending:
                self._finish(r, "error", error=self.error)
            raise

    def _admit(self) -> None:
        """Prefills waiting requests into free slots (one program call each)."""
        while True:
            with self._wake:
                free = [i for i, r in enumerate(self._live) if r is None]
                if not free or not self._waiting:
                    return
                req = self._waiting.popleft()
            if req.cancelled:
                self._finish(req, "cancelled")
                continue
            slot = free[0]
            T = len(req.ids)
            bucket = bucket_length(T, self.buckets, beyond="multiple")
            ids = np.full((1, bucket), self.tokenizer.pad_id, np.int32)
            ids[0, bucket - T:] = req.ids
            attention = np.zeros((1, bucket), np.int32)
            attention[0, bucket - T:] = 1
            pix, mask, sizes = self._media(req)
            position, first = self.slots.insert(self.params, slot, ids, attention, pix, mask, sizes, req.seed,
                                                req.temperature, req.top_k, req.top_p)
            req.first_token_at = time.perf_counter()
            self.counters["prompt_tokens"] += T
            h = self._host
            h["index"][slot], h["position"][slot], h["step"][slot] = req.prefix_length, position, 1
            h["seed"][slot], h["temperature"][slot] = req.seed, req.temperature
            h["top_k"][slot], h["top_p"][slot] = req.top_k, req.top_p
            with self._wake:
                self._live[slot] = req
            self._take(slot, first)

    def _media(self, req: Request):
        """The request's media as the slot program takes them: modulation pads to the slot's items and to the frame
        bucket of the request's frames (``Slots.frames_for``)."""
        s = self.slots
        if s.fusion == "none" or (req.pixel_values is None and s.visual_shape is None):
            return None, None, None
        if s.visual_shape is None:  # concat: the request's own items
            return (req.pixel_values[None], req.item_mask[None],
                    None if req.image_sizes is None else req.image_sizes[None])
        N, F, H, W = s.visual_shape
        n, f = (0, 1) if req.item_mask is None else (req.item_mask.shape[0], int(req.item_mask.sum(1).max(initial=1)))
        f_in = s.frames_for(f)
        pix = np.zeros((1, N, f_in, H, W, 3), np.float32)
        mask = np.zeros((1, N, f_in), bool)
        sizes = np.zeros((1, N, 2), np.int32) if s.anyres else None
        if req.pixel_values is not None:
            pix[0, :n, :f], mask[0, :n, :f] = req.pixel_values[:, :f], req.item_mask[:, :f]
            if sizes is not None and req.image_sizes is not None:
                sizes[0, :n] = req.image_sizes
        return pix, mask, sizes

    def _step(self) -> None:
        h = self._host
        new = self.slots.step(self.params, h["tok"], h["index"], h["position"], h["seed"], h["step"],
                              h["temperature"], h["top_k"], h["top_p"])
        live = [i for i, r in enumerate(self._live) if r is not None]
        self.history.append((time.perf_counter(), len(live)))
        for slot in live:
            h["index"][slot] += 1
            h["position"][slot] += 1
            h["step"][slot] += 1
            self._take(slot, int(new[slot]))

    def _take(self, slot: int, token: int) -> None:
        """Token ``token`` of the request in ``slot``: appended and sent, or the request ends."""
        req = self._live[slot]
        self._host["tok"][slot] = token
        if req.cancelled:
            return self._release(slot, "cancelled")
        if token in self.stop_ids:
            return self._release(slot, "stop")
        req.tokens.append(token)
        self.counters["generation_tokens"] += 1
        text = self.tokenizer.decode(req.tokens)
        for s in req.stop:
            at = text.find(s, max(len(req.text) - len(s), 0)) if s else -1
            if at >= 0:
                return self._release(slot, "stop", text[len(req.text):at])
        if len(req.tokens) >= req.max_tokens:
            return self._release(slot, "length")
        hold = max((len(s) - 1 for s in req.stop), default=0)  # a stop string may be starting
        ready = len(text) - hold
        while ready > len(req.text) and text[ready - 1] == "\ufffd":  # the rest of a multi-byte character
            ready -= 1
        if ready > len(req.text):
            delta, req.text = text[len(req.text):ready], text[:ready]
            self._send(Event(req, delta))

    def _release(self, slot: int, reason: str, delta: str | None = None) -> None:
        """Frees the slot; the answer ends with ``delta`` (default: the text not sent yet, cut at a stop string)."""
        req = self._live[slot]
        with self._wake:
            self._live[slot] = None
        if delta is None and reason != "cancelled":
            full = self.tokenizer.decode(req.tokens)
            cut = min((full.find(s) for s in req.stop if s and s in full), default=len(full))
            delta = full[len(req.text):cut]
        self._finish(req, reason, delta or "")

    def _finish(self, req: Request, reason: str, delta: str = "", error: str | None = None) -> None:
        req.text += delta
        req.finish_reason, req.finished_at = reason, time.perf_counter()
        self.counters[f"finished_{reason}"] += 1
        self._send(Event(req, delta, reason, error))
        req.done.set()

    def _send(self, event: Event) -> None:
        if event.request.on_event is not None:
            try:
                event.request.on_event(event)
            except Exception:  # a client's callback never stops the engine
                pass
