"""Multi-process start-up: ``jax.distributed.initialize`` when a run spans several processes."""

from __future__ import annotations

import importlib.util
import os
import sys

import jax
from absl import flags, logging


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


def define_flags() -> None:
    """Defines the multi-process flags every command line takes: --coordinator_address, --num_processes, --process_id."""
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
    flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")


def skip_absent_tpu() -> None:
    """On a host with libtpu installed (the TPU compiler, for dry runs) but no TPU chip and no NVIDIA GPU, runs
    on the CPU: JAX would otherwise start the TPU runtime first, print its warnings and hold libtpu's host-wide
    lock file. ``JAX_PLATFORMS``, when set, decides instead."""
    if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
        return
    try:
        from jax._src import hardware_utils

        if (importlib.util.find_spec("libtpu") is None or hardware_utils.num_available_tpu_chips_and_device_id()[0]
                or hardware_utils.has_visible_nvidia_gpu()):
            return
    except (ImportError, AttributeError):
        return
    jax.config.update("jax_platforms", "cpu")


def start_from_flags() -> None:
    """For a command line's ``main``: quietens logging (orbax and grain are chatty at INFO) unless ``--verbosity``
    was given, then joins the run's processes as the flags of :func:`define_flags` say."""
    skip_absent_tpu()
    if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
        logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    initialize(f.coordinator_address, f.num_processes, f.process_id)
