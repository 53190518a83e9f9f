"""Sizing a run without running it: compile the train step on abstract inputs, report memory and FLOPs."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from lavi_jax import sharding
from lavi_jax.data.batch import BatchSpec
from lavi_jax.train.step import jit_train_step


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def dry_run(config, mesh=None) -> dict:
    """Compiles ``config``'s train step for its global batch at the largest bucket on ``mesh`` (default:
    ``config.mesh`` over the devices at hand, real or fake); prints and returns per-device memory and FLOPs
    per step. Nothing is allocated."""
    c = config.train
    program = jit_train_step(config, mesh)
    mesh, step_fn = program.mesh, program.fn
    spec = BatchSpec.from_config(config, c.batch_size)
    batch = {k: jax.ShapeDtypeStruct(shape, dt, sharding=sharding.batch_sharding(mesh, len(shape)))
             for k, (shape, dt) in spec.shapes().items()}
    state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), program.abstract, program.shardings)
    t0 = time.time()
    with sharding.use_mesh(mesh):
        compiled = step_fn.lower(state, batch).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    report = {
        "devices": int(mesh.size), "mesh": dict(mesh.shape), "global_batch": c.batch_size, "seq_len": spec.seq_len,
        "params_bytes_per_device": bytes_per_device(state.params),
        "opt_state_bytes_per_device": bytes_per_device(state.opt_state),
        "temp_bytes_per_device": int(getattr(mem, "temp_size_in_bytes", 0)),
        "argument_bytes_per_device": int(getattr(mem, "argument_size_in_bytes", 0)),
        "output_bytes_per_device": int(getattr(mem, "output_size_in_bytes", 0)),
        # XLA counts a loop body once; the micro-batch scan runs it grad_accum times (the update outside
        # the loop is then over-counted, by far less than a micro-batch's forward and backward).
        "flops_per_step_per_device": float(cost.get("flops", 0.0)) * int(c.get("grad_accum", 1)),
        "compile_seconds": round(time.time() - t0, 1),
    }
    report["flops_per_step"] = report["flops_per_step_per_device"] * mesh.size
    if jax.process_index() == 0:
        gib = lambda b: f"{b / 2**30:8.3f} GiB"
        print(f"dry run: mesh {report['mesh']}, {report['devices']} devices, global batch {c.batch_size} x "
              f"{spec.seq_len} tokens")
        for k in ("params_bytes_per_device", "opt_state_bytes_per_device", "temp_bytes_per_device",
                  "argument_bytes_per_device", "output_bytes_per_device"):
            print(f"  {k.replace('_bytes_per_device', ''):<12} {gib(report[k])} per device")
        print(f"  flops/step   {report['flops_per_step']:.3e} ({report['flops_per_step_per_device']:.3e} per device)"
              + ("  [scan_layers: XLA counts the scanned layer stack once; use scan_layers=False for the total]"
                 if config.model.scan_layers else ""))
        print(f"  compiled in {report['compile_seconds']} s")
    return report
