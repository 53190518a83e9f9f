"""The plots of BENCHMARKS.md, drawn from the result files alone: LaVi vs concat against visual tokens (7B FLOPs,
latency, per-request memory) and the TPU compiler's per-chip memory against batch."""

from __future__ import annotations

import os
import sys

from benchmarks import report
from benchmarks.report import LABEL_FUSION, PAPER, _peak

LAVI_STYLE = {"color": "tab:blue", "marker": "o", "linestyle": "-", "label": "LaVi (modulation)"}
CONCAT_STYLE = {"color": "tab:red", "marker": "s", "linestyle": "--", "label": "concat (LLaVA-OV style)"}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def _ok(settings: dict) -> list[dict]:
    return sorted((s for s in settings.values() if "error" not in s), key=lambda s: s["visual_tokens"])


def _flops_panel(ax, f: dict) -> None:
    """7B FLOPs per sample vs visual tokens, with the paper's -94 % (concat x 0.06) as a dotted line."""
    s = _ok(f["settings"])
    x = [v["visual_tokens"] for v in s]
    concat = [v["concat"]["total_flops"] / 1e12 for v in s]
    ax.plot(x, [v["lavi"]["total_flops"] / 1e12 for v in s], **LAVI_STYLE)
    ax.plot(x, concat, **CONCAT_STYLE)
    keep = 1 - PAPER["flops_reduction_pct"] / 100
    ax.plot(x, [c * keep for c in concat], ":", color="gray", label=f"paper: -{PAPER['flops_reduction_pct']:.0f} % of concat")
    for v, c in zip(s, concat):
        ax.annotate(f"-{v['reduction_pct']:.1f}%", (v["visual_tokens"], c), textcoords="offset points", xytext=(-12, 6),
                    fontsize=7)
    ax.set_ylabel("TFLOP per sample (prefill + 31 decode steps)")
    ax.set_title(f"FLOPs, 7B geometry ({f['method']})", fontsize=10)
    ax.set_yscale("log")


def _latency_panel(ax, r: dict) -> None:
    s = _ok(r["latency"]["settings"])
    x = [v["visual_tokens"] for v in s]
    ax.plot(x, [v["modulation"]["e2e_s"] for v in s], **LAVI_STYLE)
    ax.plot(x, [v["concat"]["e2e_s"] for v in s], **CONCAT_STYLE)
    for v in s:
        ax.annotate(f"{v['speedup']['e2e_s']:.1f}x", (v["visual_tokens"], v["concat"]["e2e_s"]), textcoords="offset points",
                    xytext=(-10, 6), fontsize=7)
    where = "GPU, 7B bf16" if r["machine"]["platform"] == "gpu" else "CPU, scaled-down widths"
    ax.set_ylabel("seconds, 64-token prompt + 32 new tokens")
    ax.set_title(f"End-to-end generation ({where})", fontsize=10)
    ax.set_yscale("log")


def _memory_panel(ax, r: dict) -> None:
    """Peak memory of one request: the 7B programs (f32) when measured, else the latency section's."""
    seven_b = [v for v in _ok(r.get("flops", {}).get("settings", {})) if "memory_ratio" in v]
    if seven_b:
        s, keys, title = seven_b, ("lavi", "concat"), "Peak memory per request, 7B f32 (XLA)"
    else:
        s, keys = _ok(r["latency"]["settings"]), ("modulation", "concat")
        title = "Peak memory per request (XLA, " + ("GPU, 7B bf16)" if r["machine"]["platform"] == "gpu" else "CPU, scaled)")
    x = [v["visual_tokens"] for v in s]
    for key, style in zip(keys, (LAVI_STYLE, CONCAT_STYLE)):
        ax.plot(x, [v[key]["peak_bytes"] / 2**30 for v in s], **style)
    ax.set_ylabel("GiB (arguments + outputs + temporaries)")
    ax.set_title(title, fontsize=10)


def plot_fusions(r: dict, path: str) -> str | None:
    """FLOPs, end-to-end latency and per-request memory vs visual tokens, LaVi vs concat (the sections present)."""
    panels = [(_flops_panel, r["flops"]) if "flops" in r else None,
              (_latency_panel, r) if "latency" in r else None,
              (_memory_panel, r) if "latency" in r or any("memory_ratio" in v for v in r.get("flops", {}).get("settings", {}).values()) else None]
    panels = [p for p in panels if p]
    plt = _pyplot()
    if not panels or plt is None:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (draw, data) in zip(axes[0], panels):
        draw(ax, data)
        _plain_ticks(ax, sorted({round(x) for line in ax.get_lines() for x in line.get_xdata()}))
        ax.set_xlabel("visual tokens per sample")
        ax.margins(x=0.06, y=0.12)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, plt, r, path)


def _plain_ticks(ax, values, base=10) -> None:
    """Log x axis with a plainly written tick at each measured value."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log", base=base)
    ax.xaxis.set_major_locator(FixedLocator(values))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.tick_params(axis="x", labelsize=7, labelrotation=45 if len(values) > 4 else 0)


def _mesh_name(mesh: dict) -> str:
    return "_".join(f"{k}{v}" for k, v in mesh.items() if v > 1) or "data1"


def plot_tpu(r: dict, path: str) -> str | None:
    """TPU compiler, per chip: the 7B stage-2 train step's peak memory vs global batch for each mesh tried, and
    generation's (prefill or decode, the larger) vs batch for each tile count; 'x' marks a batch that does not fit."""
    plt = _pyplot()
    t = r["tpu"]
    tr, gen = t.get("train", {}), t.get("generation", {})
    if plt is None or not (tr.get("runs") or gen.get("runs")):
        return None
    topo = next(iter(tr.get("runs") or gen["runs"]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.9))
    ax = axes[0]
    points = {}  # (mesh, fusion) -> {batch: peak bytes or None}
    for fusion, x in tr.get("runs", {}).get(topo, {}).get("stage 2", {}).items():
        points.setdefault((_mesh_name(t["mesh"]), fusion), {})[t["train_batch"]] = _peak(x) if x.get("fits", True) else None
    for mesh, f in tr.get("batch_search", {}).get(topo, {}).items():
        for fusion, x in f.items():
            for b, v in x.get("tried", {}).items():
                points.setdefault((mesh, fusion), {})[int(b)] = _peak(v) if v.get("fits") else None
    hbm = next((x["hbm_bytes"] for f in tr.get("runs", {}).get(topo, {}).values() for x in f.values() if "hbm_bytes" in x), None)
    colours = {}
    for (mesh, fusion), by_batch in sorted(points.items()):
        style = LAVI_STYLE if fusion == "modulation" else CONCAT_STYLE
        colour = colours.setdefault(mesh, f"C{len(colours)}")
        batches = sorted(by_batch)
        fit = [(b, by_batch[b] / 2**30) for b in batches if by_batch[b] is not None]
        ax.plot([b for b, _ in fit], [y for _, y in fit], color=colour, marker=style["marker"], linestyle=style["linestyle"],
                label=f"{LABEL_FUSION[fusion]}, mesh {mesh}")
        over = [b for b in batches if by_batch[b] is None]
        if over and hbm:
            ax.plot(over, [hbm / 2**30 * 1.04] * len(over), "x", color=colour, markersize=8)
    if hbm:
        ax.axhline(hbm / 2**30, color="gray", linestyle=":", label=f"usable HBM {hbm / 2**30:.2f} GiB (x: does not fit)")
    _plain_ticks(ax, sorted({b for by_batch in points.values() for b in by_batch}), base=2)
    ax.set_xlabel(f"global batch ({t['train_seq']}-token rows + 1 image)")
    ax.set_ylabel("GiB per chip")
    ax.set_title(f"7B stage-2 train step, {topo}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1]
    series = {}  # (tiles, fusion) -> [(batch, peak)]
    for batch, tiles in gen.get("runs", {}).get(topo, {}).items():
        for tile, f in tiles.items():
            for fusion, x in f.items():
                peaks = [p for p in (_peak(x.get("prefill")), _peak(x.get("decode"))) if p is not None]
                if peaks:
                    series.setdefault((tile, fusion), []).append((int(batch.split()[-1]), max(peaks) / 2**30))
    for (tile, fusion), pts in sorted(series.items(), key=lambda kv: (int(kv[0][0].split()[0]), kv[0][1])):
        style = LAVI_STYLE if fusion == "modulation" else CONCAT_STYLE
        pts.sort()
        ax.plot([b for b, _ in pts], [y for _, y in pts], color=colours.setdefault(tile, f"C{len(colours)}"),
                marker=style["marker"], linestyle=style["linestyle"], label=f"{LABEL_FUSION[fusion]}, {tile}")
    _plain_ticks(ax, sorted({b for pts in series.values() for b, _ in pts}), base=2)
    ax.set_xlabel(f"batch ({t['prompt']}-token prompt, {t['decode_steps']} new tokens)")
    ax.set_ylabel("GiB per chip (prefill or decode, the larger)")
    ax.set_title(f"7B bf16 generation, {topo}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, plt, r, path)


def plot_serve(r: dict, path: str) -> str | None:
    """Output tokens/s and time to first token (p50) vs concurrent clients, LaVi vs concat."""
    plt = _pyplot()
    sv = r["serve"]
    fusions = [f for f in ("modulation", "concat") if f in sv]
    if plt is None or not fusions:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for f in fusions:
        rows = sv[f]["rows"]
        style = LAVI_STYLE if f == "modulation" else CONCAT_STYLE
        x = [row["clients"] for row in rows]
        for ax, key in zip(axes, ("tokens_per_s", "ttft_p50_s")):
            ax.plot(x, [row[key] for row in rows], **style)
    clients = sorted({row["clients"] for f in fusions for row in sv[f]["rows"]})
    for ax, ylabel in zip(axes, ("output tokens/s", "time to first token, p50 (s)")):
        ax.set_xscale("log", base=2)
        _plain_ticks(ax, clients, base=2)
        ax.set_xlabel("concurrent clients (closed loop, streaming)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title(f"serving, {sv['settings'].get('model', '')[:60]}", fontsize=9)
    return _save(fig, plt, r, path)


def _save(fig, plt, r: dict, path: str) -> str:
    fig.suptitle(f"{r['name']}: {r['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot(r: dict, directory: str) -> str | None:
    """Writes ``<directory>/<name>.png`` for a result with plotted sections; -> its path (None: nothing to plot)."""
    path = os.path.join(directory, f"{r['name']}.png")
    if "tpu" in r:
        return plot_tpu(r, path)
    if "flops" in r or "latency" in r:
        return plot_fusions(r, path)
    if "serve" in r:
        return plot_serve(r, path)
    return None


def write_plots(directory: str) -> list[str]:
    """Rebuilds every result's plot from its JSON; -> the paths written."""
    return [p for p in (plot(r, directory) for r in report.results(directory)) if p]
