"""LaVi vs LLaVA-OV-style concat at 7B as the TPU compiler sees them: AOT compiles for TPU slices, no TPU needed.

    python benchmarks/run.py --sections tpu          # both parts, in two processes side by side (~1 h on 2 cores)
    python benchmarks/run.py --sections tpu --resume # finish / reassemble from the part files of an earlier run
    python -m benchmarks.tpu --part train --out /tmp/train.json   # one part

Needs libtpu (``pip install "jax[tpu]==<jax version>"``). Every figure comes
from :func:`lavi_jax.train.dry_run` pieces: programs compiled by libtpu for the
abstract chips of a topology, XLA's memory analysis per chip (peak = arguments
+ outputs + temp - donated) against the chip's HBM, FLOPs with every layer
counted (the programs lowered unrolled with XLA attention), the step-time
lower bound at the chip's nominal bf16 peak.

* ``train``: ``configs/lavi_qwen2_7b_siglip.py`` vs ``configs/llava_ov_7b_concat.py``,
  the training preset (``mixed``: bf16 compute, f32 params and AdamW state),
  scanned layers, full remat, mesh fsdp 16 x tensor 4, global batch 64 x 2048
  text tokens with one 729-token image per row (concat's sequence is 2048 + 728
  tokens: the placeholder becomes the visual tokens), attention ``auto`` (splash
  on TPU). In this order, so that a run cut short keeps the goal's figures:
  stage 2 (projector + conditioners + LLM trainable) on v5e:8x8; the largest
  global batch that fits there (256 first, doubling while it fits up to 512:
  one compile each, so the answer is "below 256", 256 or 512, not bisected
  further), and with fsdp over all 64 chips (the lever) when it is below 256;
  splash vs xla attention at batch 64; stage 1 (projector + conditioners) on
  v5e; both stages on v5p:4x4x4 (64 chips).
* ``generation``: Generator's prefill of a 64-token prompt with one visual item
  of 1 / 4 / 10 tiles (729 tokens each), then 32 decode steps (one step
  compiled at the final cache length, counted 32 times), at batch 1 and 32, the
  inference preset (bf16 params), on v5e:8x8 with the same mesh.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

FUSIONS = ("modulation", "concat")
TOPOLOGIES = ("v5e:8x8", "v5p:4x4x4")
MESH = {"data": 1, "fsdp": 16, "tensor": 4}
LEVER_MESH = {"data": 1, "fsdp": 64, "tensor": 1}
STAGES = {"stage 1": "projector+conditioners", "stage 2": "projector+conditioners+llm"}
TRAIN_BATCH, TRAIN_SEQ = 64, 2048
MAX_BATCH = 512  # the batch search stops here
GEN_BATCHES, GEN_TILES, PROMPT, DECODE_STEPS = (1, 32), (1, 4, 10), 64, 32
PARTS = ("train", "generation")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_config(fusion: str, stage: str, batch: int = TRAIN_BATCH, attention: str = "auto", mesh=None):
    from benchmarks import common
    from lavi_jax import config as C

    cfg = C.get(common.FUSION_CONFIGS[fusion])
    C.set_precision(cfg.model, "mixed")
    cfg.model.update(scan_layers=True, remat_policy="full", attention=attention)
    cfg.train.update(batch_size=batch, trainable=STAGES[stage])
    cfg.data.update(seq_buckets=(TRAIN_SEQ,), max_images=1, num_frames=1, packing=False)  # one image per row
    cfg.mesh.update(mesh or MESH)
    return cfg


def generation_config(fusion: str):
    from benchmarks import common
    from lavi_jax import config as C

    cfg = C.get(common.FUSION_CONFIGS[fusion])
    C.set_precision(cfg.model, "bf16")
    cfg.model.update(scan_layers=True, attention="auto")
    cfg.data.update(max_images=1)
    cfg.mesh.update(MESH)
    return cfg


class Recorder:
    """Collects results and rewrites the part's JSON after every measurement (a long run keeps what it has)."""

    def __init__(self, path: str | None, resume: bool = False):
        self.path, self.data = path, {}
        if resume and path and os.path.exists(path):
            with open(path) as f:
                self.data = json.load(f)
            self.data.pop("finished", None)
            self._refit(self.data)

    @staticmethod
    def _refit(data: dict) -> None:
        """Fit and headroom of kept measurements against today's chip table (``section/topology/...``)."""
        from lavi_jax.train import dry_run as _, topology  # noqa: F401  (the module, not the function)

        def walk(d, chip):
            if isinstance(d, dict) and "hbm_bytes" in d:
                if "bytes_per_device" in d:
                    sys.modules["lavi_jax.train.dry_run"].fit_against(d, chip)
                else:  # refused by the compiler
                    d["hbm_bytes"] = chip.hbm_bytes
            elif isinstance(d, dict):
                for v in d.values():
                    walk(v, chip)

        for section in ("runs", "batch_search", "xla_attention"):
            for topo, d in data.get(section, {}).items():
                walk(d, topology.parse(topo)[0])

    def get(self, keys: tuple):
        d = self.data
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return None
            d = d[k]
        return d

    def has(self, keys: tuple) -> bool:
        """Measured already (by the run this one resumes), errors excepted."""
        v = self.get(keys)
        return v is not None and not (isinstance(v, dict) and "error" in v)

    def put(self, keys: tuple, value) -> None:
        d = self.data
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = value
        if self.path:
            with open(self.path, "w") as f:
                json.dump(self.data, f, indent=1, default=float)


def _compile(fn, what: str) -> dict:
    t0 = time.time()
    try:
        r = fn()
    except Exception as e:  # the TPU compiler refuses a program that does not fit HBM
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log(f"  {what}: failed after {time.time() - t0:.0f} s: {msg[:300]}")
        if "RESOURCE_EXHAUSTED" in msg or "memory" in msg.lower():
            return {"fits": False, "compiler_error": msg[:500]}
        return {"error": msg[:500], "traceback": traceback.format_exc()[-2000:]}
    progs = r if "prefill" in r or "decode" in r else {"": r}
    peaks = ", ".join(f"{k} {p['bytes_per_device']['peak'] / 2**30:.2f}" for k, p in progs.items() if "bytes_per_device" in p)
    log(f"  {what}: peak {peaks} GiB/chip, fits {[p.get('fits') for p in progs.values()]}, {time.time() - t0:.0f} s")
    return r


def run_train(rec: Recorder) -> None:
    from lavi_jax.train import topology
    from lavi_jax.train import dry_run as _  # noqa: F401  (the module, not the function of the same name)
    dr = sys.modules["lavi_jax.train.dry_run"]

    meshes = {t: topology.make_mesh(MESH, t) for t in TOPOLOGIES}
    chips = {t: topology.chip_of(m) for t, m in meshes.items()}
    v5e = TOPOLOGIES[0]

    def base(topo, stage, fusion):  # batch 64
        if not rec.has(("runs", topo, stage, fusion)):
            cfg = train_config(fusion, stage)
            rec.put(("runs", topo, stage, fusion),
                    _compile(lambda: dr.train_program(cfg, meshes[topo], chips[topo]), f"train {topo} {stage} {fusion}"))

    def xla(fusion):  # splash (auto on TPU) vs xla attention, stage 2
        if not rec.has(("xla_attention", v5e, fusion)):
            cfg = train_config(fusion, "stage 2", attention="xla")
            rec.put(("xla_attention", v5e, fusion), _compile(
                lambda: dr.train_program(cfg, meshes[v5e], chips[v5e], flops=False), f"train {v5e} stage 2 {fusion} xla"))

    def search(fusion, label, mesh_shape):
        """Largest global batch that fits at stage 2: 256 (the goal) first, doubling while it fits; None: < 256."""
        mesh = meshes[v5e] if mesh_shape is MESH else topology.make_mesh(mesh_shape, v5e)
        key = ("batch_search", v5e, label, fusion)

        def fits(batch):
            if not rec.has(key + ("tried", str(batch))):
                cfg = train_config(fusion, "stage 2", batch=batch, mesh=mesh_shape)
                r = _compile(lambda: dr.train_program(cfg, mesh, chips[v5e], flops=False),
                             f"batch search {v5e} {label} {fusion} batch {batch}")
                rec.put(key + ("tried", str(batch)),
                        {k: r[k] for k in ("fits", "bytes_per_device", "compiler_error", "error") if k in r})
            return bool(rec.get(key + ("tried", str(batch))).get("fits"))

        batch, largest = 256, None
        while batch <= MAX_BATCH and fits(batch):
            largest, batch = batch, batch * 2
        rec.put(key + ("largest",), largest)
        return largest

    base(v5e, "stage 2", "modulation")  # the goal's settings first: a run cut short keeps them
    if (search("modulation", "fsdp16_tensor4", MESH) or 0) < 256:
        search("modulation", "fsdp64", LEVER_MESH)
    base(v5e, "stage 2", "concat")
    xla("modulation")
    if (search("concat", "fsdp16_tensor4", MESH) or 0) < 256:
        search("concat", "fsdp64", LEVER_MESH)
    xla("concat")
    for topo, stage in ((v5e, "stage 1"), (TOPOLOGIES[1], "stage 2"), (TOPOLOGIES[1], "stage 1")):
        for fusion in FUSIONS:
            base(topo, stage, fusion)


def run_generation(rec: Recorder) -> None:
    from lavi_jax.train import topology
    from lavi_jax.train import dry_run as _  # noqa: F401  (the module, not the function of the same name)
    dr = sys.modules["lavi_jax.train.dry_run"]

    topo = TOPOLOGIES[0]
    mesh = topology.make_mesh(MESH, topo)
    chip = topology.chip_of(mesh)
    for tiles in sorted(GEN_TILES, key=lambda t: t != 4):  # 4 tiles (the goal's setting) first
        for batch in GEN_BATCHES:
            for fusion in FUSIONS:
                cfg = generation_config(fusion)
                key = ("runs", topo, f"batch {batch}", f"{tiles} tiles", fusion)
                if rec.has(key):
                    continue
                r = _compile(lambda: dr.generation_programs(cfg, mesh, chip, batch=batch, prompt_len=PROMPT, frames=tiles,
                                                            new_tokens=DECODE_STEPS + 1),
                             f"generation {topo} batch {batch} {tiles} tile(s) {fusion}")
                rec.put(key, r)


def run(parts=PARTS, out_dir: str | None = None, resume: bool = False) -> dict:
    """Runs ``parts``, each in its own process (side by side), and returns the section's result. A part file an
    interrupted run left (no "finished") is resumed; ``resume=True`` also keeps a finished one's measurements."""
    import subprocess

    out_dir = out_dir or os.path.join(ROOT, "benchmarks", "results")
    t0 = time.time()
    procs = {}
    for part in parts:  # an interrupted run's part file (no "finished") is resumed, a finished one redone
        path = os.path.join(out_dir, f".tpu-{part}.json")
        keep = os.path.exists(path) and (resume or "finished" not in json.load(open(path)))
        procs[part] = (path, subprocess.Popen([sys.executable, "-m", "benchmarks.tpu", "--part", part, "--out", path]
                                              + (["--resume"] if keep else []), cwd=ROOT))
    out = {"topologies": list(TOPOLOGIES), "mesh": MESH, "lever_mesh": LEVER_MESH, "stages": STAGES,
           "train_batch": TRAIN_BATCH, "train_seq": TRAIN_SEQ, "prompt": PROMPT, "decode_steps": DECODE_STEPS}
    for part, (path, proc) in procs.items():
        rc = proc.wait()
        with open(path) as f:
            out[part] = json.load(f)
        if rc:
            out[part]["returncode"] = rc
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=PARTS, required=True)
    p.add_argument("--out", required=True, help="JSON file, rewritten after every compile")
    p.add_argument("--resume", action="store_true", help="keep the measurements already in --out, run the rest")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    rec = Recorder(args.out, resume=args.resume)
    rec.data.setdefault("started", time.strftime("%Y-%m-%d %H:%M %Z"))
    (run_train if args.part == "train" else run_generation)(rec)
    rec.put(("finished",), time.strftime("%Y-%m-%d %H:%M %Z"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
