"""Multi-process start-up: ``jax.distributed.initialize`` when a run spans several processes."""

from __future__ import annotations

import os

import jax


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins the run's processes. A no-op for single-process runs.

    On TPU pods and SLURM/Open MPI clusters JAX finds the peers itself (set
    ``LAVI_DISTRIBUTED=1`` or pass the arguments); on CPU, pass all three. CPU
    runs use gloo collectives.
    """
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    if not explicit and os.environ.get("LAVI_DISTRIBUTED") != "1":
        return
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
