"""The multi-host generation runner: answers a task's samples on every device of every process and scores them.

    runner = Runner(model, mesh, tokenizer, processor, batch_size=64)
    result = runner.run(params, Task(name="pope", questions="llava_pope_test.jsonl",
                                     annotations="coco_pope/", image_root="val2014"))
    # {"metrics": {...}, "per_sample": [...], "failures": [...], ...}

How a task runs. Every process loads the same samples (the scorer's ``load``)
and tokenises every prompt; samples are grouped by their visual layout (item
count; video or image), sorted by prompt length and cut into global batches of
``batch_size`` rows, the last of each group padded with invalid rows, so every
process runs the same number of batches. A batch's images and videos are sized
for its own samples (a batch of one-image questions carries one item slot even
when the task also has ten-image samples; a text-only batch carries none). Each process loads the images
and videos of the rows its devices hold (the mesh's batch axes), in a thread
pool one batch ahead; the rows become one global batch (``BatchSpec``, prompts
left-padded to a length bucket) and the ``Generator`` (greedy, compiled once per
bucket) decodes them. Outputs and failure reasons are gathered on every
process; process 0 writes ``<out>/<task>.json`` and draws the progress bar.

With an output folder (a local path or a ``gs://`` URI), process 0 also logs
every batch's predictions as it goes, one part file per batch in
``<out>/<task>.predictions/``, and a rerun of the same task, checkpoint and
config skips the samples logged there (``resume``), so a preempted run resumes
and scores as an uninterrupted one.

Any global batch works on any mesh: it is rounded up to a multiple of the
mesh's batch shards (``data`` x ``fsdp``), and rows past the last sample of a
batch repeat a real prompt without images; their outputs are dropped.

A sample whose image or video is missing, unreadable, too large or outside the
image root, or whose prompt cannot be built, is not generated for: it is passed
to the scorer as a failure (scored wrong) and listed with its reason.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from lavi_jax import sharding
from lavi_jax.data.batch import BatchSpec, bucket_length
from lavi_jax.data.media import VIDEO, MediaLoader, media_items
import lavi_jax.eval.scorers as scorers
from lavi_jax.eval.resume import PredictionLog, config_hash, log_dir, run_header
from lavi_jax.eval.results import write_result
from lavi_jax.eval.tasks import Task
from lavi_jax.generate import DEFAULT_BUCKETS, Generator

REASON_BYTES = 512  # failure reasons travel between processes as fixed-size byte rows
PROMPT_KEYS = ("input_ids", "attention_mask")
VISUAL_KEYS = ("pixel_values", "item_mask")


def conversation(sample: dict, num_items: int) -> list[dict]:
    """The prompt turns: the sample's own conversation, or one human turn with an ``<image>`` per item."""
    if sample.get("conversation") is not None:
        return sample["conversation"]
    text = sample["prompt"].replace("<video>", "<image>")
    tags = text.count("<image>")
    if tags == 0:
        text = "<image>\n" * num_items + text
    elif tags != num_items:
        raise ValueError(f"{tags} <image> tags in the prompt for {num_items} images/videos")
    return [{"from": "human", "value": text}]


def _safe(fn, *args):
    """``(fn(*args), None)``, or ``(None, reason)`` when it raises."""
    try:
        return fn(*args), None
    except MemoryError:
        raise
    except Exception as e:  # one bad sample never stops the run
        return None, f"{type(e).__name__}: {e}"


@dataclasses.dataclass(frozen=True)
class _Layout:
    """The visual slots of one global batch: its largest item count and frames per video (0 items: text only)."""

    num_items: int
    frames: int


@dataclasses.dataclass
class _Plan:
    """A task's prompts cut into global batches, each with its own visual layout."""

    prompts: dict[int, np.ndarray]  # sample index -> prompt token ids
    batches: list[list[int]]  # sample indices of each global batch, shortest prompts first within a layout
    layouts: list[_Layout]  # per batch
    batch_size: int  # global rows per batch
    loaders: dict[int, MediaLoader]  # frames -> loader


class Runner:
    """Evaluates tasks with one model on one mesh; generators (compiled programs) are reused across calls.

    ``batch_size`` is the global batch (rounded up to a multiple of the mesh's
    batch shards, and down to what a task needs).
    """

    def __init__(self, model, mesh, tokenizer, processor, *, batch_size: int, num_frames: int = 1,
                 max_image_pixels: int | None = None, num_threads: int = 8, buckets=DEFAULT_BUCKETS,
                 progress: bool = True):
        self.model, self.mesh, self.tokenizer, self.processor = model, mesh, tokenizer, processor
        self.shards = mesh.shape["data"] * mesh.shape["fsdp"]
        self.batch_size = -(-max(int(batch_size), 1) // self.shards) * self.shards
        self.num_frames, self.max_image_pixels = int(num_frames), max_image_pixels
        self.num_threads, self.buckets = max(int(num_threads), 1), tuple(buckets)
        self.progress = progress and os.environ.get("LAVI_NO_PROGRESS") != "1"
        self._generators: dict[int, Generator] = {}

    def generator(self, max_new_tokens: int) -> Generator:
        if max_new_tokens not in self._generators:
            self._generators[max_new_tokens] = Generator(
                self.model, max_new_tokens=max_new_tokens, stop_ids=self.tokenizer.stop_ids,
                pad_id=self.tokenizer.pad_id, buckets=self.buckets)
        return self._generators[max_new_tokens]

    def local_rows(self, batch: int) -> list[int]:
        """Rows of a global batch that this process's devices hold."""
        indices = sharding.batch_sharding(self.mesh, 1).addressable_devices_indices_map((batch,))
        return sorted({r for idx in indices.values() for r in range(*idx[0].indices(batch))})

    def config_hash(self) -> str:
        """Hash of what shapes answers besides the params: model config, frames, pixel limit, image size."""
        return config_hash(self.model.config, self.num_frames, self.max_image_pixels,
                           getattr(self.processor, "output_size", None))

    def run(self, params, task: Task, out_dir: str | None = None, *, checkpoint: dict | None = None) -> dict:
        """Generates, scores and (process 0, when ``out_dir``) writes ``<out_dir>/<label>.json``.

        With ``out_dir``, predictions are logged as they are made and a rerun resumes from the log when
        ``checkpoint`` (``{"path", "step"}``, naming ``params``) and the task and config match.
        """
        t0 = time.time()
        ev = scorers.get(task.name, **task.options)
        samples = ev.load(task.questions, task.annotations, image_root=task.image_root, limit=task.limit)
        failures: dict[str, str] = {}
        log = PredictionLog(log_dir(out_dir, task.label), run_header(task, checkpoint, self.config_hash())) \
            if out_dir else None
        done = log.open() if log else {}
        predictions: dict[str, str] = {}
        try:
            plan = self._plan(samples, task, failures, skip=set(done))
            resumed = 0
            for s in samples:
                record = done.get(s["id"])
                if record is not None and s["id"] not in failures:
                    resumed += 1
                    if record.get("error"):
                        failures[s["id"]] = record["error"]
                    else:
                        predictions[s["id"]] = record["prediction"]
            predictions.update(self._answer(params, task, samples, plan, failures, log))
        finally:
            if log:
                log.close()
        scored = ev.score(samples, predictions, failures)
        result = {"task": task.label, "evaluator": task.name, "convention": getattr(ev, "convention", None),
                  "metrics": scored["metrics"],
                  "num_samples": len(samples), "num_failed": len(failures),
                  "failures": [{"id": s["id"], "reason": failures[s["id"]]} for s in samples if s["id"] in failures],
                  "settings": {"questions": _jsonable(task.questions), "annotations": _jsonable(task.annotations),
                               "image_root": task.image_root, "max_new_tokens": task.max_new_tokens,
                               "limit": task.limit, "options": task.options, "global_batch": plan.batch_size,
                               "devices": int(self.mesh.size), "processes": jax.process_count(),
                               "checkpoint": checkpoint, "resumed": resumed},
                  "seconds": round(time.time() - t0, 3)}
        prompt_of = {s["id"]: s.get("prompt") for s in samples}
        result["per_sample"] = [{**row, "prompt": prompt_of.get(row.get("id"))} for row in scored["per_sample"]]
        if out_dir and jax.process_index() == 0:
            write_result(result, out_dir)
        return result

    def _plan(self, samples: list[dict], task: Task, failures: dict[str, str], skip=frozenset()) -> _Plan:
        """Tokenises every prompt (failures go to ``failures``) and cuts the rest, less the ids in ``skip``,
        into global batches."""
        prompts: dict[int, np.ndarray] = {}
        items: dict[int, list] = {}
        limit = self.model.config.llm.max_position_embeddings - task.max_new_tokens
        for i, s in enumerate(samples):
            if s.get("error"):
                failures[s["id"]] = s["error"]
                continue
            found, error = _safe(media_items, s)
            if error is None:
                items[i] = found
                ids, error = _safe(lambda: self.tokenizer.encode_prompt(conversation(s, len(found))))
            if error is None and len(ids) > limit:
                error = f"prompt of {len(ids)} tokens leaves no room for {task.max_new_tokens} new tokens"
            if error:
                failures[s["id"]] = error
            else:
                prompts[i] = np.asarray(ids, np.int32)
        # Samples are grouped by their own visual layout (item count, video or not), so a batch of one-image
        # questions is not sized for the task's largest multi-image or video sample; then by prompt length.
        visual = self.model.config.fusion != "none"
        own = {i: _Layout(len(items[i]) if visual else 0,
                          self.num_frames if any(k == VIDEO for k, _ in items[i]) else 1) for i in prompts}
        order = sorted((i for i in prompts if samples[i]["id"] not in skip),
                       key=lambda i: (own[i].num_items, own[i].frames, len(prompts[i]), i))
        B = min(self.batch_size, max(-(-len(order) // self.shards), 1) * self.shards)
        batches, layouts = [], []
        for key in dict.fromkeys(own[i] for i in order):
            group = [i for i in order if own[i] == key]
            for k in range(0, len(group), B):
                batches.append(group[k:k + B])
                layouts.append(key)
        loaders = {f: MediaLoader(self.processor, f, task.image_root, self.max_image_pixels, joined=True)
                   for f in {lay.frames for lay in layouts}}
        return _Plan(prompts=prompts, batches=batches, layouts=layouts, batch_size=B, loaders=loaders)

    def _answer(self, params, task: Task, samples: list[dict], plan: _Plan, failures: dict[str, str],
                log: PredictionLog | None = None) -> dict[str, str]:
        """Generates for every planned sample; media failures go to ``failures``; each batch's outcomes go to
        ``log``. Returns id -> answer."""
        gen, local, batches = self.generator(task.max_new_tokens), self.local_rows(plan.batch_size), plan.batches
        predictions: dict[str, str] = {}
        bar = None
        if jax.process_index() == 0 and self.progress:
            from tqdm import tqdm  # only for the progress bar

            bar = tqdm(total=sum(map(len, batches)), desc=f"eval {task.label}", unit="sample", dynamic_ncols=True,
                       leave=False)
        with concurrent.futures.ThreadPoolExecutor(self.num_threads) as pool:
            def submit(b):
                if b >= len(batches) or not plan.layouts[b].num_items:
                    return {}
                lay = plan.layouts[b]
                return {r: pool.submit(_safe, plan.loaders[lay.frames].load_sample, samples[batches[b][r]], lay.num_items)
                        for r in local if r < len(batches[b])}

            pending = submit(0)
            for b, batch in enumerate(batches):
                loaded = {r: f.result() for r, f in pending.items()}
                pending = submit(b + 1)
                tokens, lengths, reasons = self._generate(params, gen, [plan.prompts[i] for i in batch], loaded,
                                                          local, plan, plan.layouts[b])
                records = []
                for r, i in enumerate(batch):
                    sid = samples[i]["id"]
                    reason = bytes(reasons[r]).rstrip(b"\0").decode("utf-8", "replace")
                    if reason:
                        failures[sid] = reason
                    else:
                        predictions[sid] = self.tokenizer.decode(tokens[r, :lengths[r]]).strip()
                    records.append({"id": sid, "prediction": predictions.get(sid), "error": reason or None})
                if log is not None:
                    log.append(records)
                if bar is not None:
                    bar.update(len(batch))
        if bar is not None:
            bar.close()
        return predictions

    def _generate(self, params, gen, prompts, loaded, local, plan: _Plan, layout: _Layout):
        """One global batch -> (tokens, lengths, failure reasons as bytes) for all rows, on every process."""
        T = bucket_length(max(len(p) for p in prompts), self.buckets, beyond="multiple")
        loader, visual = plan.loaders[layout.frames], layout.num_items > 0
        spec = BatchSpec(batch_size=plan.batch_size, seq_len=T, max_items=max(layout.num_items, 1),
                         num_frames=loader.item_frames, image_size=self.processor.output_size, visual=visual,
                         anyres=loader.anyres)
        host = dataclasses.replace(spec, batch_size=len(local)).zeros(self.tokenizer.pad_id)  # this process's rows
        reasons = np.zeros((len(local), REASON_BYTES), np.uint8)
        for j, r in enumerate(local):
            p = prompts[r] if r < len(prompts) else prompts[0]  # padding rows repeat a real prompt
            host["input_ids"][j, T - len(p):] = p
            host["attention_mask"][j, T - len(p):] = 1
            if visual:
                value, error = loaded.get(r, (None, None))
                if error:
                    raw = error.encode("utf-8")[:REASON_BYTES]
                    reasons[j, :len(raw)] = np.frombuffer(raw, np.uint8)
                if value is not None:
                    host["pixel_values"][j], host["item_mask"][j], sizes = value
                    if spec.anyres:
                        host["image_sizes"][j] = sizes
        keys = PROMPT_KEYS + (VISUAL_KEYS + (("image_sizes",) if spec.anyres else ()) if visual else ())
        args = [self._global(host[k], local, spec.shapes()[k][0]) for k in keys]
        with sharding.use_mesh(self.mesh):
            tokens, lengths = gen(params, *args)
        gathered = (tokens, lengths, self._global(reasons, local, (plan.batch_size, REASON_BYTES)))
        out = multihost_utils.process_allgather(gathered, tiled=True)
        return tuple(np.asarray(x) for x in out)

    def _global(self, rows: np.ndarray, local: list[int], shape: tuple) -> jax.Array:
        """The global array of ``shape`` whose rows ``local`` are this process's ``rows`` (in that order)."""
        position = {r: j for j, r in enumerate(local)}

        def block(index):
            return rows[[position[r] for r in range(*index[0].indices(shape[0]))]]

        return jax.make_array_from_callback(shape, sharding.batch_sharding(self.mesh, len(shape)), block)


def _jsonable(value: Any):
    return value if value is None or isinstance(value, (str, int, float, list)) else str(value)
