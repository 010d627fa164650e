"""`hvdtrain bench report RESULTS_DIR`: report.md, report.json and PNG plots from benchmark results.

Reads what `bench scaling` and `bench allreduce` wrote (scaling.json, raw/allreduce-*.json) and records
the machine, versions and Horovod settings beside the figures.
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hvdtrain.costmodel import Link, project  # noqa: E402
from hvdtrain.errors import ConfigError  # noqa: E402
from hvdtrain.atomic import write_json, write_text  # noqa: E402

PROJECTED_RANKS = [2, 8, 16, 32, 64, 128, 256, 512]
LABELS = {"horovod": "hvdtrain (Horovod, tuned)", "horovod-gloo": "hvdtrain (Horovod over Gloo)",
          "horovod-default": "Horovod defaults",
          "ddp": "PyTorch DDP (gloo)", "nocomm": "no communication (ceiling)"}


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {"python": platform.python_version()}
    for module in ("torch", "horovod", "numpy", "mpi4py"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            pass
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory, 1),
            "kernel": platform.release(), "versions": versions}


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _scaling_plots(rows: list[dict], out: Path) -> list[str]:
    modes = [m for m in LABELS if any(r["mode"] == m for r in rows)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in modes:
        series = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["ranks"])
        ranks = [r["ranks"] for r in series]
        ax1.plot(ranks, [r["samples_per_s"] for r in series], "o-", label=LABELS[mode])
        if series[0]["ranks"] == 1 and mode == "horovod":
            ax1.plot(ranks, [series[0]["samples_per_s"] * n for n in ranks], "k--", label="ideal (N x T(1))")
        if all(r["efficiency"] is not None for r in series):
            ax2.plot(ranks, [r["efficiency"] for r in series], "o-", label=LABELS[mode])
    ax1.set(xlabel="ranks", ylabel="samples/s (all ranks)", title="Throughput (weak scaling)")
    ax2.set(xlabel="ranks", ylabel="E(N) = T(N) / (N T(1))", title="Scaling efficiency", ylim=(0, 1.1))
    for ax in (ax1, ax2):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    _save(fig, out / "scaling.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    counts = sorted({r["ranks"] for r in rows})
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        values = [next((r["samples_per_s"] for r in rows if r["mode"] == mode and r["ranks"] == n), 0) for n in counts]
        ax.bar([c + (i - (len(modes) - 1) / 2) * width for c in range(len(counts))], values, width, label=LABELS[mode])
    ax.set_xticks(range(len(counts)), [f"{n} ranks" for n in counts])
    ax.set(ylabel="samples/s", title="hvdtrain vs Horovod defaults vs DDP vs ceiling")
    ax.legend(fontsize=8)
    _save(fig, out / "comparison.png")
    return ["scaling.png", "comparison.png"]


def _bandwidth_plot(allreduce: list[dict], out: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    for result in allreduce:
        rows = result["rows"]
        ax.plot([r["bytes"] for r in rows], [r["bus_gb_s"] or r["alg_gb_s"] for r in rows], "o-",
                label=f"{_name(result)} ({result['ranks']} ranks)")
    rows = allreduce[0]["rows"]
    ax.plot([r["bytes"] for r in rows], [r["memcpy_gb_s"] for r in rows], "k--", label="one memcpy (limit)")
    ax.set(xscale="log", yscale="log", xlabel="message bytes", ylabel="bus bandwidth (GB/s)",
           title="Allreduce bus bandwidth")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    _save(fig, out / "allreduce.png")
    return "allreduce.png"


def _bandwidth_table(title: str, allreduce: list[dict]) -> list[str]:
    md = [f"## {title}", "", "| MiB | " + " | ".join(_name(a) for a in allreduce) + " | memcpy |",
          "|---|" + "---|" * (len(allreduce) + 1)]
    for i, row in enumerate(allreduce[0]["rows"]):
        md.append(f"| {row['bytes'] / 2**20:g} | " + " | ".join(
            f"{(a['rows'][i]['bus_gb_s'] or a['rows'][i]['alg_gb_s']):.2f}" for a in allreduce)
            + f" | {row['memcpy_gb_s']:.2f} |")
    return [*md, ""]


def _link(allreduce: dict) -> str:
    return allreduce.get("link", "loopback")  # results written before links were recorded: loopback


def _name(allreduce: dict) -> str:
    return allreduce["impl"] if _link(allreduce) == "loopback" else f"{allreduce['impl']} over {_link(allreduce)}"


def _calibrate(allreduce: list[dict]) -> Link | None:
    """The link from plain MPI (mpi4py); Horovod's own cost per call from its gap on small messages."""
    transport = next((a for a in allreduce if a["impl"] == "mpi4py"), None)
    horovod = next((a for a in allreduce if a["impl"] == "horovod-mpi"), None)
    if not (transport and horovod):
        return None
    large = [r for r in transport["rows"] if r["bytes"] >= 2**20]
    fitted = Link.fit_ring([r["bytes"] for r in large], [r["seconds"] for r in large], transport["ranks"])
    # latency from the smallest message: the fit's intercept is lost in the large-message noise
    alpha = transport["rows"][0]["seconds"] / (2 * (transport["ranks"] - 1))
    gaps = sorted(h["seconds"] - m["seconds"] for h, m in zip(horovod["rows"], transport["rows"]) if h["bytes"] <= 2**20)
    return Link(alpha, fitted.beta, overhead=max(0.0, gaps[len(gaps) // 2]))


def _projection(link: Link, link_name: str, gradient_bytes: float, compute_s: float, measured: list[dict],
                out: Path, filename: str) -> tuple[str, dict]:
    curves = project(link, gradient_bytes, compute_s, PROJECTED_RANKS)
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, values in curves.items():
        ax.plot(PROJECTED_RANKS, values, "-", label=f"model: {method}")
    if measured:
        ax.plot([r["ranks"] for r in measured], [r["efficiency"] for r in measured], "ks", label="measured (hvdtrain)")
    ax.set(xscale="log", xlabel="ranks", ylabel="efficiency (no overlap)", ylim=(0, 1.05),
           title=f"Projection: {gradient_bytes / 1e6:.1f} MB gradients, {compute_s * 1e3:.0f} ms compute\n{link_name}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, out / filename)
    return filename, {"ranks": PROJECTED_RANKS, "efficiency": curves}


def build(results_dir: Path, out: Path | None = None) -> dict[str, Any]:
    out = out or results_dir
    scaling_file = results_dir / "scaling.json"
    allreduce_files = sorted((results_dir / "raw").glob("allreduce-*.json"))
    if not scaling_file.exists() and not allreduce_files:
        raise ConfigError(f"{results_dir}: no scaling.json or raw/allreduce-*.json; run `hvdtrain bench scaling` "
                          "and `hvdtrain bench allreduce --out` there first")
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": machine()}
    md = ["# hvdtrain scaling report", "", f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
          f"{report['machine']['memory_gib']} GiB, host {report['machine']['host']}; versions "
          + ", ".join(f"{k} {v}" for k, v in report["machine"]["versions"].items()) + ".", ""]
    plots = []
    rows, capped = [], []
    if scaling_file.exists():
        scaling = json.loads(scaling_file.read_text())
        rows = scaling["rows"]
        settings = scaling["settings"]
        report["scaling"] = scaling
        md += ["## Training throughput (measured on every rank, median of repeated runs)", "",
               f"Model {settings['model']} (width {settings['width']}, {rows[0]['params']:,} parameters), input "
               f"{settings['shape']}, batch {settings['batch_size']} per rank, {settings['steps']} timed steps after "
               f"{settings['warmup']} warm-up, {rows[0]['threads']} thread(s) per rank. Horovod settings: "
               + ", ".join(f"{k}={v}" for k, v in settings["horovod_env"].items()) + ".", "",
               "| mode | link | ranks | samples/s | efficiency | step ms | forward+backward ms | exchange+optimizer ms |",
               "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            eff = f"{r['efficiency']:.2f}" if r["efficiency"] is not None else "-"
            md.append(f"| {LABELS.get(r['mode'], r['mode'])} | {r.get('link', 'loopback')} | {r['ranks']} | "
                      f"{r['samples_per_s']:.0f} | {eff} | {r['step_ms']:.1f} | {r['forward_backward_ms']:.1f} | "
                      f"{r['optimizer_step_ms']:.1f} |")
        capped = [r for r in rows if r.get("link", "loopback") != "loopback"]
        rows = [r for r in rows if r.get("link", "loopback") == "loopback"]
        by = {(r["mode"], r["ranks"]): r["samples_per_s"] for r in rows}
        md.append("")
        for link_name in dict.fromkeys(r["link"] for r in capped):
            on = {r["mode"]: r["samples_per_s"] for r in capped if r["link"] == link_name}
            if "horovod" in on and "ddp" in on:
                md.append(f"- 2 ranks over {link_name}: hvdtrain relative to DDP {on['horovod'] / on['ddp']:.2f}x"
                          + (f", to Horovod's defaults {on['horovod'] / on['horovod-default']:.2f}x"
                             if "horovod-default" in on else ""))
            if "horovod-gloo" in on and "ddp" in on:
                md.append(f"- 2 ranks over {link_name}: hvdtrain over Gloo relative to DDP "
                          f"{on['horovod-gloo'] / on['ddp']:.2f}x" + (f", to hvdtrain over MPI "
                          f"{on['horovod-gloo'] / on['horovod']:.2f}x" if "horovod" in on else ""))
        for n in sorted({r["ranks"] for r in rows}):
            ratios = [f"{LABELS[m]} {by['horovod', n] / by[m, n]:.2f}x" for m in ("ddp", "horovod-default", "nocomm")
                      if (m, n) in by and ("horovod", n) in by]
            if ratios:
                md.append(f"- {n} rank(s): hvdtrain relative to " + ", ".join(ratios))
        plots += _scaling_plots(rows, out)
        md += ["", "![throughput and efficiency](scaling.png)", "", "![comparison](comparison.png)", ""]
    every = sorted((json.loads(p.read_text()) for p in allreduce_files),
                   key=lambda a: (_link(a) != "loopback", _link(a), a["impl"]))
    half = [a for a in every if a.get("dtype") == "float16"]
    if half:  # bench allreduce --dtype float16: what compression.method=fp16 sends
        report["allreduce_float16"] = half
        md += _bandwidth_table("float16 allreduce bus bandwidth (GB/s), what `compression.method=fp16` sends", half)
    allreduce = [a for a in every if a.get("dtype", "float32") == "float32"]
    if allreduce:
        report["allreduce"] = allreduce
        md += _bandwidth_table("Allreduce bus bandwidth (GB/s)", allreduce)
        links = list(dict.fromkeys(_link(a) for a in allreduce))
        for link_name in links:
            largest = {a["impl"]: a["rows"][-1] for a in allreduce if _link(a) == link_name}
            if "mpi4py" in largest and largest["mpi4py"]["bus_gb_s"]:
                md += [f"- {largest['mpi4py']['bytes'] / 2**20:g} MiB over {link_name}: " + ", ".join(
                    f"{impl} {row['bus_gb_s'] / largest['mpi4py']['bus_gb_s']:.2f}x" for impl, row in largest.items()
                    if impl != "mpi4py" and row["bus_gb_s"]) + " of mpi4py's bus bandwidth"]
        plots.append(_bandwidth_plot(allreduce, out))
        md += ["", "![bus bandwidth](allreduce.png)", ""]
        horovod_rows = sorted((r for r in rows if r["mode"] == "horovod"), key=lambda r: r["ranks"])
        if horovod_rows:
            gradient_bytes = horovod_rows[0]["params"] * 4
            compute_s = horovod_rows[0]["forward_backward_ms"] / 1e3
            report["projection"] = {"gradient_bytes": gradient_bytes, "compute_s": compute_s, "links": {}}
            for link_name in links:
                on_link = [a for a in allreduce if _link(a) == link_name and a["ranks"] > 1]
                link = _calibrate(on_link)
                if link is None:
                    continue
                # training points measured on this link (bench scaling --links), with the one-rank run
                measured = horovod_rows if link_name == "loopback" else \
                    [r for r in horovod_rows if r["ranks"] == 1] + sorted(
                        (r for r in capped if r["mode"] == "horovod" and r["link"] == link_name), key=lambda r: r["ranks"])
                measured = [r for r in measured if r["efficiency"] is not None]
                name = (f"{link_name}: alpha {link.alpha * 1e6:.0f} us, beta {link.beta / 1e9:.3f} GB/s, "
                        f"Horovod {link.overhead * 1e3:.1f} ms per call")
                plot, projection = _projection(link, name, gradient_bytes, compute_s, measured, out,
                                               "projection.png" if link_name == "loopback" else f"projection-{link_name}.png")
                plots.append(plot)
                report["projection"]["links"][link_name] = {
                    "alpha_s": link.alpha, "beta_bytes_per_s": link.beta, "overhead_s": link.overhead,
                    "calibrated_on": "mpi4py Allreduce (link), horovod-mpi minus mpi4py at <= 1 MiB (per-call "
                                     "overhead)", **projection}
                md += [f"## Scale-out projection over {link_name} (alpha-beta model, `hvdtrain/costmodel.py`)", "",
                       f"Calibrated on {name}; gradients {gradient_bytes / 1e6:.1f} MB, compute "
                       f"{compute_s * 1e3:.1f} ms per step, no overlap assumed. Efficiency by ranks:", "",
                       "| method | " + " | ".join(str(n) for n in PROJECTED_RANKS) + " |",
                       "|---|" + "---|" * len(PROJECTED_RANKS)]
                for method, values in projection["efficiency"].items():
                    md.append(f"| {method} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
                md += ["", f"![projection over {link_name}]({plot})", ""]
    report["plots"] = plots
    write_json(out / "report.json", report)
    write_text(out / "report.md", "\n".join(md) + "\n")
    return report
