"""Eval tasks: which scorer runs on which files, from ``config.evals``.

``config.evals.tasks`` names settings blocks of ``config.evals`` (a comma-separated
string such as ``"pope,textvqa"``, or a sequence of keys). Every known benchmark
has a block (``lavi_jax.config.EVAL_TASKS``, fields as ``lavi_jax.config.eval_task``)::

    --config.evals.tasks=pope --config.evals.pope.questions=llava_pope_test.jsonl \\
    --config.evals.pope.annotations=coco_pope --config.evals.pope.image_root=val2014 \\
    --config.evals.pope.options.prompt_suffix=none

A task of one's own is a new block with a ``name`` (the scorer): in a config file
``config.evals.pope_small = config_lib.eval_task(name="pope", questions=..., limit=100)``,
or with eval.py ``--config.evals.pope_small="{'name': 'pope', 'questions': '...'}"``.
``config.evals.tasks`` may also be a mapping ``{key: settings}``.

Empty values take the ``config.evals`` defaults (``max_new_tokens``, ``limit``; 0
is none); ``llava_json`` reads ``config.data.eval_json`` with ``config.data.image_root``.
``options`` go to the scorer's constructor; an option given as ``none`` (the
command line's spelling) is ``None``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lavi_jax import config as config_lib
import lavi_jax.eval.scorers as scorers

# name, questions, annotations, image_root, max_new_tokens, limit, options
SETTINGS = tuple(config_lib.eval_task().keys())
NO_QUESTIONS_FILE = ("mme",)  # scorers that find their files without `questions`


@dataclasses.dataclass
class Task:
    """One benchmark run: scorer ``name`` on ``questions`` (+ ``annotations``) with media under ``image_root``.

    ``label`` names the results file (default: ``name``); ``options`` go to the
    scorer's constructor (e.g. ``metric`` for VQA).
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


def task_keys(config) -> list[str]:
    """The keys ``config.evals.tasks`` names (in order)."""
    spec = config.evals.get("tasks") or ()
    if isinstance(spec, str):
        return [s.strip() for s in spec.split(",") if s.strip()]
    if hasattr(spec, "keys"):
        return list(spec.keys())
    return [str(s).strip() for s in spec if str(s).strip()]


def _as_dict(value) -> dict:
    return dict(value.to_dict() if hasattr(value, "to_dict") else value)


def _option(value):
    return None if isinstance(value, str) and value.strip().lower() == "none" else value


def make_task(config, key: str, settings) -> Task:
    """The task of block ``key`` with ``settings`` (a ConfigDict or dict), defaults filled in."""
    evals, flag = config.evals, f"--config.evals.{key}"
    if not hasattr(settings, "keys"):
        raise ValueError(f"eval task {key!r}: config.evals.{key} must be a settings block, got {settings!r}; "
                         f"set its fields, e.g. {flag}.questions=...")
    s = _as_dict(settings)
    unknown = sorted(set(s) - set(SETTINGS))
    if unknown:
        raise ValueError(f"eval task {key!r}: unknown settings {unknown} (known: {', '.join(SETTINGS)}); "
                         f"scorer options go in {flag}.options.<option>")
    name = s.get("name") or key
    if name.lower() not in scorers.names():
        raise ValueError(f"eval task {key!r}: unknown scorer {name!r} (set {flag}.name to one of "
                         f"{', '.join(scorers.names())})")
    limit = int(s.get("limit") or evals.get("limit") or 0)
    task = Task(name=name, label=key, questions=s.get("questions") or None, annotations=s.get("annotations") or None,
                image_root=s.get("image_root") or None,
                max_new_tokens=int(s.get("max_new_tokens") or evals.get("max_new_tokens") or 64),
                limit=limit or None, options={k: _option(v) for k, v in _as_dict(s.get("options") or {}).items()})
    if name == "llava_json":
        task.questions = task.questions or config.data.get("eval_json") or None
        task.image_root = task.image_root or config.data.get("image_root") or None
    if not task.questions and name not in NO_QUESTIONS_FILE:
        hint = " (or --config.data.eval_json)" if name == "llava_json" else ""
        raise ValueError(f"eval task {key!r}: no questions file; set {flag}.questions=...{hint}")
    return task


def tasks_from_config(config) -> list[Task]:
    """The tasks ``config.evals.tasks`` names, in order; raises ``ValueError`` naming the task and the flag to set."""
    evals, spec = config.evals, config.evals.get("tasks")
    if hasattr(spec, "keys"):
        return [make_task(config, key, spec[key]) for key in spec.keys()]
    tasks = []
    for key in task_keys(config):
        settings = evals.get(key)
        if settings is None:
            raise ValueError(
                f"eval task {key!r}: no settings block config.evals.{key} "
                f"(built-in blocks: {', '.join(config_lib.EVAL_TASKS)}); "
                f"add one in the config file, or with eval.py --config.evals.{key}=\"{{'name': '<scorer>', "
                f"'questions': '...'}}\"")
        tasks.append(make_task(config, key, settings))
    return tasks
