"""Tokenisers that turn LLaVA conversations into ``input_ids`` and an assistant-only loss mask.

Two implementations share one interface:

* ``ByteTokenizer``: built in, for the demo; 256 byte tokens plus special
  tokens, and a fixed chat template::

      <bos><|user|>question<|end|><|assistant|>answer<|end|>...

* ``HFTokenizer``: a local Hugging Face tokenizer directory with its chat
  template (``trust_remote_code`` is never used). ``<image>`` is added as a
  special token when the tokenizer lacks it; the model's embedding table must
  then cover ``vocab_size``.

``encode_conversation`` takes LLaVA turns (``[{"from": "human"|"gpt", "value": str}]``;
``"user"``/``"assistant"``/``"system"`` are accepted too) and returns int32
``input_ids`` and a ``loss_mask`` that is 1 exactly on the tokens of each
assistant answer and its end-of-turn token. Every ``<image>`` in the text
becomes exactly one ``image_token_id``; the model expands it.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

from lavi_jax import storage

IMAGE_TOKEN = "<image>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def to_messages(conversation: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """LLaVA turns -> chat messages ``[{"role", "content"}]``; validates structure."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError("conversation must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(conversation):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i} is not an object")
        speaker = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if speaker not in _ROLES:
            raise ValueError(f"turn {i} has unknown speaker {speaker!r}")
        if not isinstance(text, str):
            raise ValueError(f"turn {i} has no string value")
        role = _ROLES[speaker]
        if role == "system" and i != 0:
            raise ValueError("a system turn may only come first")
        messages.append({"role": role, "content": text})
    return messages


class Tokenizer(Protocol):
    """What the data pipeline, trainer and generator need from a tokenizer."""

    image_token_id: int
    pad_id: int
    vocab_size: int
    stop_ids: tuple[int, ...]  # tokens that end an assistant turn

    def encode_conversation(self, conversation: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids int32 [T], loss_mask int32 [T])`` for a whole conversation."""

    def encode_prompt(self, conversation: Sequence[dict[str, Any]]) -> np.ndarray:
        """int32 ids of the conversation followed by the assistant turn's opening."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``."""


def _split_images(text: str) -> list[str]:
    """``"a<image>b"`` -> ``["a", IMAGE_TOKEN, "b"]`` (empty pieces dropped)."""
    pieces = []
    for i, part in enumerate(text.split(IMAGE_TOKEN)):
        if i:
            pieces.append(IMAGE_TOKEN)
        if part:
            pieces.append(part)
    return pieces


class ByteTokenizer:
    """UTF-8 bytes (ids 0-255) plus special tokens; no files needed."""

    SPECIALS = ("<pad>", "<bos>", "<eos>", IMAGE_TOKEN, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

    def __init__(self):
        ids = {name: 256 + i for i, name in enumerate(self.SPECIALS)}
        self.special_ids = ids
        self.pad_id, self.bos_id, self.eos_id = ids["<pad>"], ids["<bos>"], ids["<eos>"]
        self.image_token_id = ids[IMAGE_TOKEN]
        self.end_id = ids["<|end|>"]
        self.role_ids = {role: ids[f"<|{role}|>"] for role in ("system", "user", "assistant")}
        self.vocab_size = 256 + len(self.SPECIALS)
        self.stop_ids = (self.end_id, self.eos_id)

    def encode(self, text: str) -> list[int]:
        """Bytes of ``text``, with ``<image>`` mapped to ``image_token_id``."""
        ids = []
        for piece in _split_images(text):
            ids.extend([self.image_token_id] if piece == IMAGE_TOKEN else piece.encode("utf-8"))
        return ids

    def encode_conversation(self, conversation):
        ids, mask = [self.bos_id], [0]
        for message in to_messages(conversation):
            target = int(message["role"] == "assistant")
            body = self.encode(message["content"]) + [self.end_id]
            ids += [self.role_ids[message["role"]]] + body
            mask += [0] + [target] * len(body)
        return np.asarray(ids, np.int32), np.asarray(mask, np.int32)

    def encode_prompt(self, conversation):
        ids = self.encode_conversation(conversation)[0] if conversation else np.asarray([self.bos_id])
        return np.concatenate([ids, [self.role_ids["assistant"]]]).astype(np.int32)

    def decode(self, ids, skip_special_tokens=True):
        names = {v: k for k, v in self.special_ids.items()}
        out, buffer = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                buffer.append(i)
                continue
            out.append(buffer.decode("utf-8", errors="replace"))
            buffer = bytearray()
            if not skip_special_tokens:
                out.append(names.get(i, ""))
        out.append(buffer.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer:
    """A local Hugging Face tokenizer directory and its chat template.

    The assistant spans are found by rendering the template on growing
    prefixes of the conversation: the text an assistant message adds after the
    rendering of the preceding messages with ``add_generation_prompt=True`` is
    its answer and end-of-turn marker (trailing whitespace excluded). The
    rendered text is tokenised span by span, so mask boundaries fall exactly on
    token boundaries and the prompt tokenises as it does at inference.
    """

    def __init__(self, path: str, chat_template: str | None = None):
        import transformers  # deferred: slow to import

        if not storage.isdir(path):
            raise FileNotFoundError(f"tokenizer directory not found: {path}")
        # transformers reads local files only: a URI's files are copied to a local cache first.
        tok = transformers.AutoTokenizer.from_pretrained(storage.local_dir(path), trust_remote_code=False)
        if chat_template is not None:
            tok.chat_template = chat_template
        if not tok.chat_template:
            raise ValueError(f"tokenizer in {path} has no chat_template")
        if IMAGE_TOKEN not in tok.get_added_vocab():
            tok.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
        self.tokenizer = tok
        self.image_token_id = int(tok.convert_tokens_to_ids(IMAGE_TOKEN))
        # Also settles the backend's truncation/padding state once, so that
        # encoding from several threads later never mutates it.
        probe = tok.encode(f"a{IMAGE_TOKEN}{IMAGE_TOKEN}b", add_special_tokens=False)
        if probe.count(self.image_token_id) != 2:
            raise ValueError(f"{IMAGE_TOKEN} does not tokenise to one token per occurrence in {path}")
        self.vocab_size = len(tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0
        stops = {tok.eos_token_id}
        for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>"):
            if marker in tok.get_added_vocab():
                stops.add(tok.convert_tokens_to_ids(marker))
        self.stop_ids = tuple(sorted(int(s) for s in stops if s is not None))

    def save_pretrained(self, path: str) -> None:
        """Writes the tokenizer (with ``<image>`` added) as a HF directory."""
        self.tokenizer.save_pretrained(path)

    def _render(self, messages, add_generation_prompt=False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def encode_conversation(self, conversation):
        messages = to_messages(conversation)
        full = self._render(messages)
        spans, pos = [], 0  # (start, end) character spans of assistant targets in `full`
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(messages[:i], add_generation_prompt=True) if i else ""
            upto = self._render(messages[: i + 1])
            if not (upto.startswith(prompt) and full.startswith(upto)) or len(prompt) < pos:
                raise ValueError("chat template does not render conversations incrementally")
            spans.append((len(prompt), len(prompt) + len(upto[len(prompt) :].rstrip())))
            pos = spans[-1][1]
        ids, mask, cursor = [], [], 0
        for start, end in spans:
            for text, target in ((full[cursor:start], 0), (full[start:end], 1)):
                tokens = self._tokens(text)
                ids += tokens
                mask += [target] * len(tokens)
            cursor = end
        tail = self._tokens(full[cursor:])
        ids += tail
        mask += [0] * len(tail)
        expected = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
        if ids.count(self.image_token_id) != expected:
            raise ValueError(f"expected {expected} image tokens, tokenised to {ids.count(self.image_token_id)}")
        return np.asarray(ids, np.int32), np.asarray(mask, np.int32)

    def encode_prompt(self, conversation):
        text = self._render(to_messages(conversation), add_generation_prompt=True)
        return np.asarray(self._tokens(text), np.int32)

    def decode(self, ids, skip_special_tokens=True):
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def make_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` for the built-in tokenizer, else a HF tokenizer directory."""
    return ByteTokenizer() if spec == "byte" else HFTokenizer(spec)


def image_token_id_in(path: str) -> int | None:
    """The id the tokenizer directory ``path`` gives ``<image>`` without loading it: its id when the tokenizer has
    it, else the id :class:`HFTokenizer` will add it at; None when ``path`` holds no ``tokenizer.json``."""
    file = storage.join(path, "tokenizer.json")
    if not storage.exists(file):
        return None
    tok = storage.read_json(file)
    added = {t["content"]: int(t["id"]) for t in tok.get("added_tokens", [])}
    if IMAGE_TOKEN in added:
        return added[IMAGE_TOKEN]
    vocab = (tok.get("model") or {}).get("vocab")
    ids = list(added.values())
    if isinstance(vocab, dict):
        ids += [int(i) for i in vocab.values()]
    elif isinstance(vocab, list):
        ids.append(len(vocab) - 1)
    return max(ids) + 1 if ids else None
