"""Metric sinks: ``<workdir>/metrics.jsonl``, TensorBoard event files and a tqdm bar (process 0 only)."""

from __future__ import annotations

import json
import os
from typing import Any

import jax


class MetricWriter:
    def __init__(self, workdir: str, total_steps: int | None = None, initial_step: int = 0, desc: str = "train"):
        self.active = jax.process_index() == 0
        self.bar = None
        self.tb = None
        self.file = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        self.file = open(os.path.join(workdir, "metrics.jsonl"), "a")
        from tensorboardX import SummaryWriter  # process 0 only: the other processes never load it

        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if total_steps:
            from tqdm import tqdm  # process 0 only

            self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True,
                            disable=os.environ.get("LAVI_NO_PROGRESS") == "1")

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.active:
            return
        clean = {k: (float(v) if hasattr(v, "__float__") else v) for k, v in values.items()}
        self.file.write(json.dumps({"step": int(step), **clean}) + "\n")
        self.file.flush()
        for k, v in clean.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, int(step))
        if self.bar is not None and "loss" in clean:
            self.bar.set_postfix(loss=f"{clean['loss']:.4f}")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()
