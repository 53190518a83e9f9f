"""Training efficiency: a train step's FLOPs (XLA cost analysis) over its measured time, against a matmul peak.

The step is ``lavi_jax.training.make_train_step`` (forward, backward, AdamW
with clipping, every parameter trainable), jitted with the state donated as
the trainer does. The peak is a large square matmul (``jnp.dot``) timed in the
same run, interleaved with the train steps, so both see the same machine load;
on a GPU the vendor's dense peak is reported as well (MFU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks import common
from lavi_jax import config as C, sharding, train as training
from lavi_jax.models.lavi import LaVi

# Dense (non-sparse) bf16 tensor-core peaks, FLOP/s, by substring of ``device_kind``; the first match wins.
NOMINAL_BF16_PEAK = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def nominal_peak(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in NOMINAL_BF16_PEAK.items() if k in kind), None)


def make_batch(m, batch: int, seq: int, frames: int) -> dict:
    ids = jnp.asarray(common.prompt_ids(m, batch=batch, length=seq, image=m.fusion != "none"))
    out = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.ones(ids.shape, jnp.float32)}
    if m.fusion != "none":
        out["pixel_values"], out["item_mask"] = common.pixels(m, frames, batch=batch, dtype=jnp.dtype(m.dtype))
    return out


def run(m, *, batch: int, seq: int, frames: int, reps: int, warmup: int = 1, matmul_n: int = 2048,
        matmul_dtype=jnp.float32, log=print) -> dict:
    model = LaVi(m)
    c = C.train(trainable="all", batch_size=batch, warmup_steps=1, num_steps=100)
    tx = training.make_optimizer(c)
    patterns = training.trainable_patterns(c.trainable)
    data = make_batch(m, batch, seq, frames)
    params = sharding.init_params(model, jax.random.key(0), data["input_ids"][:, :8])
    state = training.TrainState(step=jnp.int32(0), params=params, opt_state=training.init_opt_state(tx, params, patterns),
                                 nonfinite=jnp.int32(0))
    step = jax.jit(training.make_train_step(model, tx, c), donate_argnums=(0,))
    compiled = step.lower(state, data).compile()
    flops = common.flops_of(compiled)
    holder = {"state": state}

    def train():
        def once():
            holder["state"], metrics = compiled(holder["state"], data)
            return metrics["loss"]

        return {"s": common.timed(once)}

    load = common.load_average()
    times = common.interleaved({"train": train, "matmul": common.matmul_rate(matmul_n, matmul_dtype)}, reps=reps,
                               warmup=warmup)
    steps_run = int(jax.device_get(holder["state"].step))
    achieved = flops / times["train"]["s"]
    peak = times["matmul"]["rate"]
    out = {
        "config": common.describe(m), "fusion": m.fusion, "batch": batch, "seq": seq, "frames": frames,
        "params": sharding.count_params(params), "flops_per_step": flops, "step_s": times["train"]["s"],
        "achieved_flops_per_s": achieved, "matmul_n": matmul_n, "matmul_dtype": jnp.dtype(matmul_dtype).name,
        "matmul_flops_per_s": peak, "fraction_of_matmul_peak": achieved / peak,
        "samples": {k: times[k]["samples"] for k in times}, "load_average": load, "steps_run": steps_run,
    }
    nominal = nominal_peak(jax.devices()[0]) if jax.devices()[0].platform == "gpu" else None
    if nominal:
        out["nominal_peak_flops_per_s"] = nominal
        out["mfu"] = achieved / nominal
    log(f"  train step: {flops / 1e9:.1f} GFLOP in {times['train']['s']:.3f} s = {achieved / 1e9:.1f} GFLOP/s; "
        f"matmul {peak / 1e9:.1f} GFLOP/s -> {100 * achieved / peak:.1f} %")
    return out

