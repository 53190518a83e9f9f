"""Packed vs bucketed training batches: pad fraction, rows per second and real tokens per second, side by side.

    python -m benchmarks.packing [--batches 200] [--model-reps 3] [--no-model]

Data: synthetic conversations with a length distribution shaped like
LLaVA-1.5's 665k mix. Assumed, not fitted to the file: text tokens per
conversation log-normal with median 150 and sigma 0.9 (mean ~225, a long tail
from multi-turn LLaVA-Instruct and ShareGPT records), clipped to [16, 2047];
6 % text-only records (ShareGPT's ~40k of 665k), the rest one image each. The
examples are made directly (no decoding), so the pipeline figures are the
packer's and collator's own cost.

* bucketed: ``Collator`` with buckets (512, 1024, 2048), B samples per batch,
  one item per row (the smallest bucket that fits the batch's longest sample);
* packed: ``PackIterator`` rows of 2048 tokens, ``max_images`` items per row,
  B rows per batch.

Pad fraction = 1 - real tokens / (B x T), and for items 1 - real items /
(B x N_items). Real tokens per second on the model: the demo config's model
(modulation fusion), forward + backward of a masked next-token loss per batch
shape, times each shape's share of the sampled batches; packed batches pass
``segment_ids`` and ``position_ids`` (needs the model's segment-aware path).
Timings are medians of interleaved repetitions (``common.interleaved``).
"""

from __future__ import annotations

import argparse
import os
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, report
from lavi_jax.data.collate import Collator
from lavi_jax.data.packing import PackIterator, RowLayout, stack_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
BUCKETS = (512, 1024, 2048)
MEDIAN, SIGMA, TEXT_ONLY = 150.0, 0.9, 0.06


class _Synthetic:
    """Index -> a synthetic example (seeded per index) of the assumed LLaVA-665k length distribution."""

    def __init__(self, image_size: int, image_token_id: int, vocab: int, seed: int = 0):
        self.image_size, self.image_token_id, self.vocab, self.seed = image_size, image_token_id, vocab, seed

    def __call__(self, index: int) -> dict:
        rng = np.random.default_rng((self.seed, index))
        n = int(np.clip(rng.lognormal(np.log(MEDIAN), SIGMA), 16, max(BUCKETS) - 1))
        ids = rng.integers(1, min(self.image_token_id, self.vocab), n).astype(np.int32)
        items = 0 if rng.random() < TEXT_ONLY else 1
        if items:
            ids[1] = self.image_token_id
        loss = np.zeros(n, np.int32)
        loss[n // 3:] = 1
        s = self.image_size
        return {"input_ids": ids, "loss_mask": loss, "index": index,
                "pixel_values": np.zeros((items, 1, s, s, 3), np.float32), "item_mask": np.ones((items, 1), bool)}


def _stream(make):
    return grain.MapDataset.range(10**9).map(make).to_iter_dataset()


def pipelines(make, batch: int, max_items: int, window: int, pad_id: int = 0):
    """(bucketed, packed) endless batch iterators over the same example stream."""
    s = make.image_size
    collate = Collator(BUCKETS, 1, 1, (s, s), pad_id)
    bucketed = iter(_stream(make).batch(batch, drop_remainder=True, batch_fn=collate))
    layout = RowLayout(max(BUCKETS), max_items, 1, (s, s), pad_id)
    rows = PackIterator(iter(_stream(make)), layout, window, make)
    packed = (stack_rows([next(rows) for _ in range(batch)]) for _ in iter(int, 1))
    return bucketed, packed


def measure_pipeline(it, batches: int) -> dict:
    real = slots = items = item_slots = 0
    shapes: dict[int, int] = {}
    start = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        real += int(b["attention_mask"].sum())
        slots += b["attention_mask"].size
        items += int(b["item_mask"].any(-1).sum())
        item_slots += b["item_mask"].shape[0] * b["item_mask"].shape[1]
        shapes[b["input_ids"].shape[1]] = shapes.get(b["input_ids"].shape[1], 0) + 1
    seconds = time.perf_counter() - start
    rows = batches * b["input_ids"].shape[0]
    return {"pad_fraction": 1 - real / slots, "item_pad_fraction": 1 - items / item_slots,
            "real_tokens_per_batch": real / batches, "rows_per_s": rows / seconds, "batches_per_s": batches / seconds,
            "seq_len_counts": shapes, "item_slots_per_row": b["item_mask"].shape[1]}


def _step(model, packed: bool):
    def loss(params, b):
        kw = {"segment_ids": b["segment_ids"], "position_ids": b["positions"]} if packed else {}
        logits = model.apply({"params": params}, b["input_ids"], b["pixel_values"], b["item_mask"],
                             attention_mask=b["attention_mask"], **kw)
        logp = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.take_along_axis(logp, b["input_ids"][:, 1:, None], axis=-1)[..., 0]
        w = b["loss_mask"][:, 1:]
        return (nll * w).sum() / jnp.maximum(w.sum(), 1.0)

    return jax.jit(jax.value_and_grad(loss))


def measure_model(bucketed_it, packed_it, stats: dict, reps: int) -> dict:
    from configs.demo import get_config
    from lavi_jax import sharding
    from lavi_jax.models.lavi import LaVi

    m = get_config().model
    model = LaVi(m)
    params = sharding.init_params(model, jax.random.key(0), jnp.ones((1, 8), jnp.int32))
    samples = {}  # one sample batch per bucketed shape, plus the packed one
    while len(samples) < len(stats["bucketed"]["seq_len_counts"]):
        b = next(bucketed_it)
        samples.setdefault(f"bucketed T={b['input_ids'].shape[1]}", b)
    samples["packed"] = next(packed_it)
    fns = {}
    for name, b in samples.items():
        fn, data = _step(model, name == "packed"), jax.device_put(b)
        jax.block_until_ready(fn(params, data))
        fns[name] = (lambda fn=fn, data=data: {"s": common.timed(lambda: fn(params, data)[0])})
    times = common.interleaved(fns, reps=reps, warmup=0)
    out = {"config": common.describe(m), "step_s": {k: times[k]["s"] for k in times}}
    counts = stats["bucketed"]["seq_len_counts"]
    total = sum(counts.values())
    bucket_s = sum(times[f"bucketed T={t}"]["s"] * c / total for t, c in counts.items())
    out["bucketed_real_tokens_per_s"] = stats["bucketed"]["real_tokens_per_batch"] / bucket_s
    out["packed_real_tokens_per_s"] = stats["packed"]["real_tokens_per_batch"] / times["packed"]["s"]
    out["speedup"] = out["packed_real_tokens_per_s"] / out["bucketed_real_tokens_per_s"]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--max-images", type=int, default=16, help="visual items per packed row")
    p.add_argument("--window", type=int, default=8, help="open rows of the packer")
    p.add_argument("--model-reps", type=int, default=3)
    p.add_argument("--no-model", action="store_true")
    a = p.parse_args(argv)
    make = _Synthetic(image_size=64, image_token_id=259, vocab=264)
    bucketed, packed = pipelines(make, a.batch, a.max_images, a.window)
    stats = {"bucketed": measure_pipeline(bucketed, a.batches), "packed": measure_pipeline(packed, a.batches)}
    result = {"name": "packing", "batch": a.batch, "batches": a.batches, "max_images_per_row": a.max_images,
              "window": a.window, "buckets": BUCKETS,
              "lengths": f"lognormal(median={MEDIAN}, sigma={SIGMA}) clipped to [16, 2047], {TEXT_ONLY:.0%} text-only",
              "pipeline": stats}
    print(f"{'':10s} {'pad':>7s} {'item pad':>9s} {'real tok/batch':>15s} {'rows/s':>9s}  T")
    for name, s in stats.items():
        print(f"{name:10s} {100 * s['pad_fraction']:6.1f}% {100 * s['item_pad_fraction']:8.1f}% "
              f"{s['real_tokens_per_batch']:15.0f} {s['rows_per_s']:9.0f}  {s['seq_len_counts']}")
    if not a.no_model:
        try:
            result["model"] = measure_model(bucketed, packed, stats, a.model_reps)
            r = result["model"]
            print(f"model ({r['config']}): real tokens/s bucketed {r['bucketed_real_tokens_per_s']:.0f}, "
                  f"packed {r['packed_real_tokens_per_s']:.0f} -> {r['speedup']:.2f}x; step s {r['step_s']}")
        except TypeError as e:  # the model does not take segment_ids yet
            result["model"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"model step not measured: {result['model']['error']}")
    os.makedirs(RESULTS, exist_ok=True)
    print("wrote", report.write_json(result, RESULTS))


if __name__ == "__main__":
    main()
