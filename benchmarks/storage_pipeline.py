"""Training input pipeline from a bucket (GCS emulator on 127.0.0.1) vs from local disk, side by side in one run.

    python -m benchmarks.storage_pipeline [--images 320] [--batch 16] [--batches 40] [--threads 8] [--reps 3]

Data: ``--images`` synthetic 384 x 384 JPEGs (smooth colour fields with noise,
quality 90: ~40-60 KB each, about a COCO photo's size at this resolution) and a
LLaVA ``train.json`` with one short conversation per image, written to a local
folder and uploaded to a fresh bucket on ``benchmarks.gcs.Emulator`` (which this
benchmark starts and stops itself). Both sides run ``make_train_iterator`` with
the same config (the byte tokenizer, the SigLIP processor at 384 px, one image
per record, ``num_threads`` decoding threads, the config's default 8) and
differ only in ``train_json`` / ``image_root``: a local path or ``gs://``.

Timed: ``--batches`` batches of ``--batch`` after the first (iterator start-up,
the records file read and the first batch excluded), images/s = batches x batch
/ seconds; local and bucket interleaved, the order flipped every repetition,
median of ``--reps`` (``benchmarks.common.interleaved``). Also measured: the
median latency of one image read (``storage.read_bytes``) from each side, and
the decode + preprocess time of one image, to tell where the time goes.

The emulator is a Python server on the same cores as the pipeline; a real
bucket has higher per-request latency (tens of ms) but serves requests
concurrently, which ``num_threads`` reads overlap. ``gcp-storage-emulator`` is
a single-threaded ``http.server.HTTPServer`` closing each connection
(``benchmarks/gcs_server.py`` raises its listen backlog so that 8 threads' reads
do not wait out TCP SYN retransmits).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
import uuid

import numpy as np
from PIL import Image

from benchmarks import common
from lavi_jax import config as C
from lavi_jax import data as D
from lavi_jax import storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
IMAGE_SIZE = 384


def write_dataset(root: str, n: int, seed: int = 0) -> int:
    """``n`` 384 px JPEGs under ``root/images`` and ``root/train.json``; returns the images' total bytes."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    records, total = [], 0
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / IMAGE_SIZE
    for i in range(n):
        a, b, c = rng.uniform(0, 255, 3)
        field = np.stack([a * xx + (255 - a) * yy, b * (1 - xx) * yy + c * xx, c * np.sin(6 * xx + i) * 0.5 + 128], -1)
        pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        name = f"images/{i:05d}.jpg"
        with open(os.path.join(root, name), "wb") as f:
            f.write(buf.getvalue())
        total += buf.tell()
        records.append({"id": f"r{i}", "image": name, "conversations": [
            {"from": "human", "value": f"<image>\nWhat colour is region {i % 7}?"},
            {"from": "gpt", "value": f"It is mostly colour {i % 11}."}]})
    storage.write_json(os.path.join(root, "train.json"), records)
    return total


def upload(local: str, remote: str, threads: int = 4) -> None:
    from concurrent.futures import ThreadPoolExecutor

    names = ["train.json"] + [f"images/{n}" for n in sorted(os.listdir(os.path.join(local, "images")))]

    def one(name):
        with open(os.path.join(local, name), "rb") as f:
            storage.write_bytes(storage.join(remote, name), f.read())

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, names))


def data_config(root: str, threads: int) -> C.ConfigDict:
    return C.data(train_json=storage.join(root, "train.json"), eval_json=storage.join(root, "train.json"),
                  image_root=root, image_size=IMAGE_SIZE, seq_buckets=(64, 128), num_threads=threads,
                  max_images=1, max_bad_records=0)


class RetryCount:
    """Counts the storage layer's retry warnings (logger ``lavi_jax.storage``) while installed."""

    def __init__(self):
        import logging

        self.count = 0
        counter = self

        class Handler(logging.Handler):
            def emit(self, record):
                counter.count += "retrying" in record.getMessage()

        self.handler = Handler(logging.WARNING)
        logging.getLogger("lavi_jax.storage").addHandler(self.handler)


def pipeline_rate(root: str, threads: int, batch: int, batches: int, retries: RetryCount):
    """A candidate for :func:`common.interleaved`: a fresh iterator, the first batch untimed, then ``batches``."""
    config = data_config(root, threads)
    tok, proc = D.make_tokenizer("byte"), D.make_image_processor("siglip", IMAGE_SIZE)

    def run():
        it = D.make_train_iterator(config, tok, proc, batch_size=batch, seed=0, process_index=0, process_count=1)
        before = retries.count
        t_start = time.perf_counter()
        first = next(it)
        t0 = time.perf_counter()
        for _ in range(batches):
            b = next(it)
        t = time.perf_counter() - t0
        assert b["pixel_values"].shape[:2] == first["pixel_values"].shape[:2] == (batch, 1)
        return {"s": t, "first_batch_s": t0 - t_start, "images_per_s": batches * batch / t,
                "retries": retries.count - before}

    return run


def read_latency(root: str, names: list[str]) -> float:
    times = []
    for name in names:
        t0 = time.perf_counter()
        storage.read_bytes(storage.join(root, name))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_time(local: str, names: list[str]) -> float:
    proc = D.make_image_processor("siglip", IMAGE_SIZE)
    times = []
    for name in names:
        data = storage.read_bytes(os.path.join(local, name))
        t0 = time.perf_counter()
        proc(D.image_processor.load_image(io.BytesIO(data)))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def quiet_client_logs() -> None:
    """gcsfs's sub-loggers (credentials probing) otherwise print their debug lines through the root handler."""
    import logging

    storage._log_retries()
    for name in ("gcsfs.credentials", "gcsfs.core", "gcsfs.inventory_report", "google.auth", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run(images: int, batch: int, batches: int, threads: int, reps: int) -> dict:
    from benchmarks.gcs import serving

    quiet_client_logs()
    with serving() as server:
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "data")
            total = write_dataset(local, images)
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            server.create_bucket(bucket)
            remote = f"gs://{bucket}/data"
            t0 = time.perf_counter()
            retries = RetryCount()
            upload(local, remote)
            upload_s = time.perf_counter() - t0
            probe = [f"images/{i:05d}.jpg" for i in range(0, images, max(1, images // 20))]
            latency = {"local": read_latency(local, probe), "gs": read_latency(remote, probe)}
            decode_s = decode_time(local, probe)
            upload_retries = retries.count
            timed = common.interleaved({"local": pipeline_rate(local, threads, batch, batches, retries),
                                        "gs": pipeline_rate(remote, threads, batch, batches, retries)},
                                       reps=reps, warmup=1)
    return {
        "settings": {"images": images, "image_px": IMAGE_SIZE, "mean_image_kb": round(total / images / 1024, 1),
                     "batch": batch, "batches": batches, "num_threads": threads, "reps": reps,
                     "cpus": os.cpu_count(), "upload_s": round(upload_s, 2), "upload_retries": upload_retries},
        "read_latency_ms": {k: round(v * 1e3, 3) for k, v in latency.items()},
        "decode_preprocess_ms": round(decode_s * 1e3, 3),
        "pipeline": timed,
        "ratio_gs_vs_local": timed["gs"]["images_per_s"] / timed["local"]["images_per_s"],
    }


def table(r: dict) -> str:
    s = r["settings"]
    head = ["source", "images/s", "s per batch", "first batch s", "read latency ms", "retries per run", "vs local"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    local = r["pipeline"]["local"]["images_per_s"]
    for name, label in (("local", "local disk"), ("gs", "gs:// (emulator)")):
        p = r["pipeline"][name]
        lines.append(f"| {label} | {p['images_per_s']:.1f} | {p['s'] / s['batches']:.3f} | {p['first_batch_s']:.2f} | "
                     f"{r['read_latency_ms'][name]:.2f} | {p['retries']:g} | {p['images_per_s'] / local:.2f}x |")
    lines.append(f"\n{s['images']} JPEGs of {s['image_px']} px (mean {s['mean_image_kb']} KB), batch {s['batch']}, "
                 f"{s['batches']} timed batches, num_threads {s['num_threads']}, {s['cpus']} CPUs; decode + "
                 f"preprocess of one image {r['decode_preprocess_ms']:.1f} ms")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=320)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=40, help="timed batches per repetition (after the first)")
    p.add_argument("--threads", type=int, default=int(C.data().num_threads), help="num_threads (config default)")
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    command = "python -m benchmarks.storage_pipeline" + "".join(f" {x}" for x in (argv if argv is not None else sys.argv[1:]))
    t0, load0 = time.time(), common.load_average()
    result = run(a.images, a.batch, a.batches, a.threads, a.reps)
    result.update(name="storage_pipeline", command=command, date=time.strftime("%Y-%m-%d %H:%M %Z"),
                  elapsed_s=round(time.time() - t0, 1), load_average=[load0, common.load_average()])
    print(table(result))
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "storage_pipeline.json")
    storage.write_json(path, result, indent=1, default=float)
    print("wrote", path)


if __name__ == "__main__":
    main()
