"""Benchmark evaluation: generate answers on every device of every process, score, write results.

    runner = Runner(model, mesh, tokenizer, processor, batch_size=64)
    result = runner.run(params, Task(name="pope", questions="llava_pope_test.jsonl",
                                     annotations="coco_pope/", image_root="val2014"))
    # {"metrics": {...}, "per_sample": [...], "failures": [...], ...}

How a task runs. Every process loads the same samples (``Evaluator.load``) and
tokenises every prompt; samples are sorted by prompt length and cut into global
batches of ``batch_size`` rows, the last one padded with invalid rows, so every
process runs the same number of batches. Each process loads the images and
videos of the rows its devices hold (the mesh's batch axes), in a thread pool
one batch ahead; the rows become one global array and the ``Generator``
(greedy, compiled once per prompt-length bucket) decodes them. Outputs and
failure reasons are gathered on every process; process 0 writes
``<out>/<task>.json`` and draws the progress bar.

A sample whose image or video is missing, unreadable, too large or outside the
image root, or whose prompt cannot be built, is not generated for: it is passed
to ``Evaluator.score`` as a failure (scored wrong) and listed with its reason.

Tasks come from ``config.evals`` (see :func:`parse_tasks`); the built-in
``llava_json`` task evaluates a LLaVA-format JSON (default ``config.data.eval_json``).
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import io
import json
import os
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from lavi_jax import evaluators, sharding
from lavi_jax.evaluators import common
from lavi_jax.generate import DEFAULT_BUCKETS, Generator, bucket_length

HEADLINE = ("accuracy", "circular_accuracy", "f1", "perception", "cognition", "exact_match", "normalized_match")
_REASON_BYTES = 512


# ----------------------------------------------------------------------------- tasks


@dataclasses.dataclass
class Task:
    """One benchmark run: evaluator ``name`` on ``questions`` (+ ``annotations``) with images under ``image_root``.

    ``label`` names the results file (default: ``name``); ``options`` go to the
    evaluator's constructor (e.g. ``metric`` for VQA).
    """

    name: str
    questions: Any = None
    annotations: Any = None
    image_root: str | None = None
    max_new_tokens: int = 64
    limit: int | None = None
    label: str = ""
    options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.label = self.label or self.name


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def _settings(value) -> dict:
    """A task's settings: a ConfigDict / dict, or ``"key=value,key=value"`` (command line), or None."""
    if value is None:
        return {}
    if isinstance(value, str):
        out = {}
        for part in filter(None, (p.strip() for p in value.split(","))):
            key, sep, val = part.partition("=")
            if not sep:
                raise ValueError(f"task setting {part!r} is not key=value")
            out[key.strip()] = _parse_value(val.strip())
        return out
    return dict(value.to_dict() if hasattr(value, "to_dict") else value)


def parse_tasks(config) -> list[Task]:
    """Tasks of ``config.evals.tasks``, which is one of

    * ``"vqav2,pope"``: names; each task's settings are ``config.evals.<name>``
      (a ConfigDict, or on the command line ``"questions=...,annotations=...,image_root=..."``);
    * a ConfigDict ``{label: settings}``;
    * a sequence of names or of settings dicts.

    Settings: ``name`` (evaluator; default: the label), ``questions``,
    ``annotations``, ``image_root``, ``max_new_tokens``, ``limit``, ``label``;
    other keys are evaluator options. Defaults: ``config.evals.max_new_tokens``
    and ``config.evals.limit`` (0: all); ``llava_json`` reads ``config.data.eval_json``
    with ``config.data.image_root``.
    """
    evals = config.evals
    spec = evals.get("tasks") or ""
    entries: list[tuple[str, dict]] = []
    if isinstance(spec, str):
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    if hasattr(spec, "items"):
        entries = [(label, _settings(v)) for label, v in spec.items()]
    else:
        for item in spec:
            if isinstance(item, str):
                entries.append((item, _settings(evals.get(item))))
            else:
                s = _settings(item)
                entries.append((s.get("label") or s.get("name") or "", s))
    tasks = []
    for label, s in entries:
        name = s.pop("name", None) or label
        if not name:
            raise ValueError(f"eval task without a name: {s}")
        limit = s.pop("limit", None)
        limit = evals.get("limit", 0) if limit is None else limit
        task = Task(name=name, label=s.pop("label", None) or label,
                    questions=s.pop("questions", None), annotations=s.pop("annotations", None),
                    image_root=s.pop("image_root", None) or None,
                    max_new_tokens=int(s.pop("max_new_tokens", None) or evals.get("max_new_tokens", 64)),
                    limit=int(limit) or None, options=s)
        if name == "llava_json":
            task.questions = task.questions or config.data.get("eval_json") or None
            task.image_root = task.image_root or config.data.get("image_root") or None
        if not task.questions and name not in ("mme",):
            raise ValueError(f"eval task {task.label!r}: no questions file (set questions=...)")
        tasks.append(task)
    return tasks


# ----------------------------------------------------------------------------- samples -> model inputs


def media_items(sample: dict) -> list[tuple[str, Any]]:
    """The sample's visual items in placeholder order: images (paths or base64), then videos."""
    items = [("image", p) for p in common.as_list(sample.get("image"))]
    b64 = sample.get("metadata", {}).get("image_base64")
    if not items and b64:
        items.append(("base64", b64))
    return items + [("video", p) for p in common.as_list(sample.get("video"))]


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


def inside_root(root: str | None, path: str) -> str:
    """``path`` if it lies inside ``root`` (lexically); raises ``ValueError`` otherwise."""
    if not root:
        return path
    from lavi_jax.data.records import resolve_path

    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    try:
        return resolve_path(root, relative)
    except ValueError:
        raise ValueError(f"media path {path!r} is outside the image root {root!r}") from None


class MediaLoader:
    """Sample -> (pixel_values [N, F, H, W, 3], item_mask [N, F]); raises for unusable media.

    Media paths are as evaluators give them (joined with the image root); with
    ``image_root`` set, a path that leaves it is refused.
    """

    def __init__(self, processor, num_items: int, num_frames: int, image_root: str | None, max_pixels: int | None):
        self.processor, self.num_items, self.num_frames = processor, num_items, num_frames
        self.image_root, self.max_pixels = image_root, max_pixels

    def __call__(self, sample: dict):
        from lavi_jax.data import load_image, load_video

        h, w = self.processor.output_size
        pixels = np.zeros((self.num_items, self.num_frames, h, w, 3), np.float32)
        mask = np.zeros((self.num_items, self.num_frames), bool)
        for i, (kind, value) in enumerate(media_items(sample)):
            if kind == "base64":
                frames = [load_image(io.BytesIO(base64.b64decode(value)), self.max_pixels)]
            elif kind == "image":
                frames = [load_image(inside_root(self.image_root, value), self.max_pixels)]
            else:
                frames = load_video(inside_root(self.image_root, value), self.num_frames, self.max_pixels)
            for f, frame in enumerate(frames[: self.num_frames]):
                pixels[i, f], mask[i, f] = self.processor(frame), True
        return pixels, mask


def _safe(fn, *args):
    try:
        return fn(*args), None
    except MemoryError:
        raise
    except Exception as e:  # one bad sample never stops the run
        return None, f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------- the runner


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

    def _rows(self, batch: int) -> list[int]:
        """Rows of a global batch that this process's devices hold."""
        indices = sharding.batch_sharding(self.mesh, 1).addressable_devices_indices_map((batch,))
        return sorted({r for idx in indices.values() for r in range(*idx[0].indices(batch))})

    def _global(self, rows: dict[int, np.ndarray], shape: tuple, dtype) -> jax.Array:
        def block(index):
            return np.stack([rows[r] for r in range(*index[0].indices(shape[0]))]).astype(dtype)

        return jax.make_array_from_callback(shape, sharding.batch_sharding(self.mesh, len(shape)), block)

    def run(self, params, task: Task, out_dir: str | None = None) -> dict:
        """Generates, scores and (process 0, when ``out_dir``) writes ``<out_dir>/<label>.json``."""
        t0 = time.time()
        ev = evaluators.get(task.name, **task.options)
        samples = ev.load(task.questions, task.annotations, image_root=task.image_root, limit=task.limit)
        failures: dict[str, str] = {}
        prompts: dict[int, np.ndarray] = {}
        items = [media_items(s) for s in samples]
        limit = self.model.config.llm.max_position_embeddings - task.max_new_tokens
        for i, s in enumerate(samples):
            if s.get("error"):
                failures[s["id"]] = s["error"]
                continue
            ids, error = _safe(lambda: self.tokenizer.encode_prompt(conversation(s, len(items[i]))))
            if error is None and len(ids) > limit:
                error = f"prompt of {len(ids)} tokens leaves no room for {task.max_new_tokens} new tokens"
            if error:
                failures[s["id"]] = error
            else:
                prompts[i] = np.asarray(ids, np.int32)
        order = sorted(prompts, key=lambda i: (len(prompts[i]), i))
        B = min(self.batch_size, max(-(-len(order) // self.shards), 1) * self.shards)
        batches = [order[k:k + B] for k in range(0, len(order), B)]
        visual = self.model.config.fusion != "none" and any(items[i] for i in order)
        n_items = max((len(items[i]) for i in order), default=0) or 1
        frames = self.num_frames if any(k == "video" for i in order for k, _ in items[i]) else 1
        loader = MediaLoader(self.processor, n_items, frames, task.image_root, self.max_image_pixels)
        gen, local = self.generator(task.max_new_tokens), self._rows(B)
        predictions: dict[str, str] = {}
        bar = None
        if jax.process_index() == 0 and self.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(order), desc=f"eval {task.label}", unit="sample", dynamic_ncols=True, leave=False)

        with concurrent.futures.ThreadPoolExecutor(self.num_threads) as pool:
            def submit(b):
                if b >= len(batches) or not visual:
                    return {}
                return {r: pool.submit(_safe, loader, samples[batches[b][r]]) for r in local if r < len(batches[b])}

            pending = submit(0)
            for b, batch in enumerate(batches):
                loaded = {r: f.result() for r, f in pending.items()}
                pending = submit(b + 1)
                tokens, lengths, reasons = self._generate(params, gen, [prompts[i] for i in batch], loaded, local,
                                                          B, visual, loader)
                for r, i in enumerate(batch):
                    reason = bytes(reasons[r]).rstrip(b"\0").decode("utf-8", "replace")
                    if reason:
                        failures[samples[i]["id"]] = reason
                    else:
                        predictions[samples[i]["id"]] = self.tokenizer.decode(tokens[r, :lengths[r]]).strip()
                if bar is not None:
                    bar.update(len(batch))
        if bar is not None:
            bar.close()
        scored = ev.score(samples, predictions, failures)
        result = {"task": task.label, "evaluator": task.name, "metrics": scored["metrics"],
                  "num_samples": len(samples), "num_failed": len(failures),
                  "failures": [{"id": s["id"], "reason": failures[s["id"]]} for s in samples if s["id"] in failures],
                  "settings": {"questions": _jsonable(task.questions), "annotations": _jsonable(task.annotations),
                               "image_root": task.image_root, "max_new_tokens": task.max_new_tokens,
                               "limit": task.limit, "options": task.options, "global_batch": B,
                               "devices": int(self.mesh.size), "processes": jax.process_count()},
                  "seconds": round(time.time() - t0, 3)}
        prompt_of = {s["id"]: s.get("prompt") for s in samples}
        result["per_sample"] = [{**row, "prompt": prompt_of.get(row.get("id"))} for row in scored["per_sample"]]
        if out_dir and jax.process_index() == 0:
            os.makedirs(out_dir, exist_ok=True)
            path = os.path.join(out_dir, task.label.replace("/", "_").replace(os.sep, "_") + ".json")
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(result, f, indent=1, ensure_ascii=False, default=str)
            os.replace(path + ".tmp", path)
        return result

    def _generate(self, params, gen, prompts, loaded, local, B, visual, loader):
        """One global batch -> (tokens, lengths, failure reasons as bytes) for all B rows, on every process."""
        T = bucket_length(max(len(p) for p in prompts), self.buckets)
        pad = self.tokenizer.pad_id
        ids, mask, reasons, pix, imask = {}, {}, {}, {}, {}
        for r in local:
            p = prompts[r] if r < len(prompts) else prompts[0]  # padding rows repeat a real prompt
            ids[r] = np.concatenate([np.full(T - len(p), pad, np.int32), p])
            mask[r] = (np.arange(T) >= T - len(p)).astype(np.int32)
            reasons[r] = np.zeros(_REASON_BYTES, np.uint8)
            if visual:
                value, error = loaded.get(r, (None, None))
                if error:
                    raw = error.encode("utf-8")[:_REASON_BYTES]
                    reasons[r][:len(raw)] = np.frombuffer(raw, np.uint8)
                if value is None:
                    value = (np.zeros((loader.num_items, loader.num_frames) + loader.processor.output_size + (3,),
                                      np.float32), np.zeros((loader.num_items, loader.num_frames), bool))
                pix[r], imask[r] = value
        args = [self._global(ids, (B, T), np.int32), self._global(mask, (B, T), np.int32)]
        if visual:
            n, f = loader.num_items, loader.num_frames
            h, w = loader.processor.output_size
            args += [self._global(pix, (B, n, f, h, w, 3), np.float32), self._global(imask, (B, n, f), bool)]
        with sharding.use_mesh(self.mesh):
            tokens, lengths = gen(params, *args)
        out = multihost_utils.process_allgather((tokens, lengths, self._global(reasons, (B, _REASON_BYTES), np.uint8)),
                                                tiled=True)
        return tuple(np.asarray(x) for x in out)


def _jsonable(value):
    return value if value is None or isinstance(value, (str, int, float, list)) else str(value)


# ----------------------------------------------------------------------------- reports


def headline(metrics: dict) -> dict[str, float]:
    return {k: metrics[k] for k in HEADLINE if isinstance(metrics.get(k), (int, float))}


def summary_table(results: list[dict]) -> str:
    """A plain-text table: one row per task, its headline metrics, samples and failures."""
    rows = []
    for r in results:
        scores = "  ".join(f"{k} {v:.1f}" if k in ("perception", "cognition") else f"{k} {v:.2%}"
                           for k, v in headline(r["metrics"]).items())
        rows.append((r["task"], scores, str(r["num_samples"]), str(r["num_failed"])))
    head = ("task", "scores", "samples", "failed")
    widths = [max(len(x[c]) for x in rows + [head]) for c in range(4)]
    line = lambda x: f"{x[0]:<{widths[0]}}  {x[1]:<{widths[1]}}  {x[2]:>{widths[2]}}  {x[3]:>{widths[3]}}"
    return "\n".join([line(head), "  ".join("-" * w for w in widths)] + [line(x) for x in rows])


def flat_scalars(results: list[dict]) -> dict[str, float]:
    """``{"<task>/<metric>": value}`` of every top-level number, for metric writers."""
    return {f"{r['task']}/{k}": float(v) for r in results for k, v in r["metrics"].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


# ----------------------------------------------------------------------------- entry points


def make_runner(config, model, mesh, tokenizer, processor) -> Runner:
    e, d = config.evals, config.data
    return Runner(model, mesh, tokenizer, processor, batch_size=e.get("batch_size") or config.train.batch_size,
                  num_frames=d.get("num_frames", 1), max_image_pixels=d.get("max_image_pixels"),
                  num_threads=d.get("num_threads", 8))


def run_tasks(runner: Runner, params, tasks: list[Task], out_dir: str | None = None, *, print_summary: bool = True):
    results = [runner.run(params, task, out_dir) for task in tasks]
    if print_summary and jax.process_index() == 0:
        print(summary_table(results) + (f"\nper-sample results in {out_dir}" if out_dir else ""), flush=True)
    return results


def training_evals(config, model, mesh, tokenizer, processor, workdir: str):
    """For the trainer: ``None`` without ``config.evals.tasks``, else ``fn(params, step) -> {"<task>/<metric>": x}``
    that also writes ``<workdir>/results/step_<step>/<task>.json``."""
    if not config.evals.get("tasks"):
        return None
    tasks, runner = parse_tasks(config), make_runner(config, model, mesh, tokenizer, processor)

    def evaluate(params, step: int) -> dict[str, float]:
        out = os.path.join(workdir, "results", f"step_{step}")
        return flat_scalars(run_tasks(runner, params, tasks, out, print_summary=False))

    return evaluate


def evaluate_checkpoint(config, path: str, out_dir: str | None, *, step: int | None = None) -> list[dict]:
    """eval.py: the model (and its data settings) from the checkpoint at ``path``, the tasks from ``config``."""
    from lavi_jax import checkpoint, trainer
    from lavi_jax.models.lavi import LaVi

    if os.path.basename(os.path.normpath(path)).isdigit() and os.path.isdir(os.path.join(path, "params")):
        step = int(os.path.basename(os.path.normpath(path))) if step is None else step
    config = config.copy_and_resolve_references()
    try:
        saved = checkpoint.read_config(path, step)
    except FileNotFoundError:
        raise
    except Exception:  # a checkpoint without a readable config: the run config describes the model
        saved = None
    with config.unlocked():
        if saved is not None and "model" in saved:
            config.model = saved.model
            sd = saved.get("data") or {}
            for key in ("eval_json", "image_root", "tokenizer", "processor", "num_frames"):  # run config wins for paths
                if key in sd and (key not in ("eval_json", "image_root") or not config.data.get(key)):
                    config.data[key] = sd[key]
        config.data.tokenizer = checkpoint.tokenizer_dir(path) or config.data.tokenizer
        if not os.path.isdir(str(config.data.processor)):
            config.data.processor = config.model.vision.type
        config.data.image_size = config.model.vision.image_size
    tasks = parse_tasks(config) if config.evals.get("tasks") else None
    if tasks is None:
        if not config.data.get("eval_json"):
            raise ValueError("no eval tasks: set --config.evals.tasks (e.g. llava_json, pope, vqav2)")
        with config.unlocked():
            config.evals.tasks = "llava_json"
        tasks = parse_tasks(config)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    tokenizer, processor = trainer.data_components(config)
    model = LaVi(config.model)
    params = checkpoint.restore_params(path, config.model, mesh, step)
    return run_tasks(make_runner(config, model, mesh, tokenizer, processor), params, tasks, out_dir)
