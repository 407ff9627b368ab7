"""PNG plots: the roofline with each operator as a point, and a profile's measured vs predicted time."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from infera.profiler.hardware import DTYPE_KEYS, HardwareSpec  # noqa: E402
from infera.profiler.roofline import RooflineReport  # noqa: E402

if TYPE_CHECKING:
    from infera.profiler.profile import ProfileReport

LABEL_MERGE = 2.0
PHASE_MARKERS = {"decode": "o", "prefill": "s"}


def plot_roofline(reports: list[RooflineReport], hw: HardwareSpec, path: str | Path) -> Path:
    """Log-log roofline of ``hw`` (memory roof, compute-dtype matmul roof, fp32 vector roof) with every
    operator of each report at its intensity and the FLOP/s its bound allows."""
    path = Path(path)
    dtype = reports[0].dtype
    points = [(r, op) for r in reports for op in r.operators if op.flops > 0 and math.isfinite(op.intensity)]
    skipped = sorted({op.name for r in reports for op in r.operators if op.flops == 0})
    on_chip = sorted({op.name for r in reports for op in r.operators if op.flops and not op.bytes})
    roofs = {f"{dtype} matmul": hw.peak_flops(dtype)}
    if DTYPE_KEYS.get(dtype, dtype) != "fp32":
        roofs["fp32 element-wise"] = hw.peak_flops("fp32")
    ridges = [peak / hw.memory_bandwidth for peak in roofs.values()]
    xs = [op.intensity for _, op in points] + ridges
    lo, hi = min(xs) / 4, max(xs) * 4
    fig, ax = plt.subplots(figsize=(10, 6.5))
    ax.set_xscale("log")
    ax.set_yscale("log")
    top = max(roofs.values())
    ax.plot([lo, top / hw.memory_bandwidth], [hw.memory_bandwidth * lo, top], color="black", lw=1.5,
            label=f"memory {hw.memory_bandwidth / 1e9:,.0f} GB/s")
    for (name, peak), style in zip(roofs.items(), ["-", "--"]):
        ax.plot([peak / hw.memory_bandwidth, hi], [peak, peak], color="dimgray", ls=style, lw=1.5,
                label=f"{name} {peak / 1e12:,.3g} TFLOP/s")
    for k, r in enumerate(reports):
        mine = [op for rr, op in points if rr is r]
        ax.scatter([op.intensity for op in mine], [op.flops / op.time_s for op in mine],
                   marker=PHASE_MARKERS.get(r.phase, "^"), color=f"C{k}", zorder=3,
                   label=f"{r.phase} batch {r.batch}, context {r.context}: {r.tok_s_ceiling:,.0f} tok/s ceiling")
    clusters: list[list] = []  # one label per chain of points each within LABEL_MERGE of the previous
    for _, op in sorted(points, key=lambda p: (p[1].intensity, p[1].flops / p[1].time_s)):
        prev = clusters[-1][-1] if clusters else None
        if prev and op.intensity / prev.intensity < LABEL_MERGE and \
                abs(math.log(op.flops / op.time_s * prev.time_s / prev.flops)) < math.log(LABEL_MERGE):
            clusters[-1].append(op)
        else:
            clusters.append([op])
    for ops in clusters:
        names = list(dict.fromkeys(op.name for op in ops))
        text = "\n".join(", ".join(names[i:i + 3]) for i in range(0, len(names), 3))
        ax.annotate(text, (ops[0].intensity, ops[0].flops / ops[0].time_s), fontsize=7, xytext=(8, -6),
                    textcoords="offset points", va="top")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("attainable FLOP/s")
    ax.set_title(f"{reports[0].model} on {hw.name} ({hw.description})\n"
                 f"{dtype} compute, weights {reports[0].weights}, KV {reports[0].kv_cache_dtype}", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="upper left")
    notes = ([f"not plotted: {', '.join(skipped)} (no FLOPs, data movement only)"] if skipped else []) + (
        [f"{', '.join(on_chip)} (fused, no memory traffic)"] if on_chip else [])
    if notes:
        fig.text(0.01, 0.01, "; ".join(notes), fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_profile(report: ProfileReport, path: str | Path) -> Path:
    """Measured vs predicted time per operator type; per step, operator time vs time outside
    operators; on CUDA, the batch sweep's launch+queue time and kernel time."""
    path = Path(path)
    panels = 3 if report.sweep else 2
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5.5))
    ax = axes[0]
    ops = [op for op in report.operators if op["measured_ms"] or op["predicted_ms"]]
    ys = range(len(ops))
    ax.barh([y - 0.2 for y in ys], [op["measured_ms"] for op in ops], height=0.4, label="measured", color="tab:orange")
    ax.barh([y + 0.2 for y in ys], [op["predicted_ms"] for op in ops], height=0.4,
            label=f"roofline ({report.hardware})", color="tab:blue")
    ax.set_yticks(list(ys), [op["operator"] for op in ops], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("time over the profiled steps (ms)")
    ax.set_title("per operator type", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1]
    steps = [s["step"] for s in report.steps]
    ax.bar(steps, [s["op_ms"] for s in report.steps], label="operators", color="tab:orange")
    ax.bar(steps, [s["outside_ms"] for s in report.steps], bottom=[s["op_ms"] for s in report.steps],
           label="outside operators", color="tab:gray")
    ax.plot(steps, [s["predicted_ms"] for s in report.steps], color="tab:blue", marker=".", label="roofline")
    ax.set_xlabel("engine step")
    ax.set_ylabel("ms")
    ax.set_title("per step: wall time = operators + outside", fontsize=10)
    ax.legend(fontsize=8)
    if report.sweep:
        ax = axes[2]
        batches = [r["batch"] for r in report.sweep]
        ax.plot(batches, [r["wall_ms"] for r in report.sweep], marker="o", label="step wall")
        ax.plot(batches, [r["kernel_ms"] for r in report.sweep], marker="o", label="kernel busy")
        ax.plot(batches, [r["tklqt_ms"] for r in report.sweep], marker="o", label="TKLQT")
        if report.cpu_gpu_transition_batch:
            ax.axvline(report.cpu_gpu_transition_batch, color="black", ls="--", label="CPU -> GPU-bound")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("decode batch size")
        ax.set_ylabel("ms per step")
        ax.set_title("CUDA: launch + queuing time per decode step", fontsize=10)
        ax.legend(fontsize=8)
    t = report.totals
    fig.suptitle(f"{report.model} on {report.device}, {report.workload} batch {report.batch}: "
                 f"{t['tok_s']:,.1f} tok/s measured, {100 * t['fraction_of_bound']:.3g}% of the roofline bound",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
