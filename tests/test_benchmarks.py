"""Benchmark plumbing: argument checks and the report built from stored result files."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import plots, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def test_unknown_section_is_rejected_before_any_work():
    out = subprocess.run([sys.executable, "benchmarks/run.py", "--sections", "flops,bogus", "--no-markdown"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "bogus" in out.stderr and "flops, latency, vs_torch, train" in out.stderr


@pytest.mark.parametrize("name", ["cpu-flops", "cpu"])
def test_report_rows_and_findings_from_stored_results(name):
    with open(os.path.join(RESULTS, f"{name}.json")) as f:
        r = json.load(f)
    rows = report.rows(r)
    flops = [row for row in rows if row[0].startswith("FLOPs / sample")]
    assert len(flops) == len(r["flops"]["settings"])
    for row, s in zip(flops, sorted(r["flops"]["settings"].values(), key=lambda s: s["visual_tokens"])):
        assert f"{-s['reduction_pct']:.1f} %" in row
    text = "\n".join(report.findings(r))
    assert "FLOPs reduction:" in text
    # Results measured before the prefill computed logits at text positions only explain the difference.
    old = any("reduction_pct_if_text_logits_only" in s for s in r["flops"]["settings"].values())
    assert ("LM-head logits at the visual positions" in text) == old
    assert "latency" not in r or "Generation LaVi vs concat" in text


def test_report_rows_of_the_hd_geometry_results():
    """LaVi-HD vs concat rows at OneVision's geometry: one FLOPs, cache and latency row per input, HF's counts."""
    with open(os.path.join(RESULTS, "cpu-hd.json")) as f:
        r = json.load(f)
    h = r["hd"]["settings"]
    assert {n: (s["tiles"], s["concat_tokens"]) for n, s in h.items()} == {
        "1024x768 photo": (7, 4725), "2048x512 panorama (4:1)": (13, 7249), "32-frame video": (32, 6273)}
    rows = report.rows(r)
    flops = [row for row in rows if row[0].startswith("LaVi-HD FLOPs / sample")]
    assert [f"-{s['reduction_pct']:.1f} %" in row[4] for row, s in zip(flops, h.values())] == [True] * 3
    assert sum(row[0].startswith("KV + visual cache") for row in rows) == 3
    assert sum(row[0].startswith("End-to-end, 32 new tokens, OneVision") for row in rows) == len(r["hd"]["latency"])
    assert "LaVi-HD at LLaVA-OneVision-7B's geometry" in "\n".join(report.findings(r))


def test_plots_rebuilt_from_stored_results_are_the_ones_linked(tmp_path):
    """Every result with FLOPs, latency, TPU or serving sections gets its plot back from its JSON alone; the README and
    BENCHMARKS.md link only plots that exist in benchmarks/results, each under 150 kB."""
    import re
    import shutil

    from PIL import Image

    for name in os.listdir(RESULTS):
        if name.endswith(".json"):
            shutil.copy(os.path.join(RESULTS, name), tmp_path / name)
    written = {os.path.basename(p) for p in plots.write_plots(str(tmp_path))}
    plotted = set()
    for name in os.listdir(RESULTS):
        if name.endswith(".json"):
            with open(os.path.join(RESULTS, name)) as f:
                r = json.load(f)
            if r.get("suite") == report.SUITE and {"flops", "latency", "tpu", "serve"} & set(r):
                plotted.add(r["name"] + ".png")
    assert written == plotted and {"cpu.png", "tpu.png"} <= written
    for name in written:
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.width > 600
    linked = set()
    for doc in ("README.md", "BENCHMARKS.md"):
        with open(os.path.join(ROOT, doc)) as f:
            linked |= set(re.findall(r"!\[[^\]]*\]\(benchmarks/results/([^)]+\.png)\)", f.read()))
    assert {"cpu.png", "tpu.png"} <= linked <= written
    for name in linked:
        assert os.path.getsize(os.path.join(RESULTS, name)) < 150_000
