"""Outputs of a run: the terminal table, JSON, CSV and a PNG plot, plus the machine description."""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

TIMING_METHOD = {
    "cuda": "CUDA events around each repetition (no host sync until the final synchronize), median; "
    "inputs rotate over several sets",
    "cpu": "time.perf_counter around each repetition, median; inputs rotate over several sets",
}
CHECK_RULE = (
    "loss, grad wrt features and class weights vs the float64 reference on the check rows: "
    "rel err (L2) <= 2 * eager-in-dtype rel err + floor (fp32 1e-5, fp16 1e-4, bf16 1e-3); "
    "pred/hard equal to float64 on untied rows; WRONG cases are not timed"
)


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> Optional[str]:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: torch.device) -> dict:
    """The machine a run measured: GPU or CPU model, core count, library versions, git commit."""
    import fused_margin

    info = {
        "device": device.type,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "fused_margin": fused_margin.__version__,
        "git_commit": _git_commit(),
        "liger_kernel": _version("liger-kernel"),
        "cut_cross_entropy": _version("cut-cross-entropy"),
        "timestamp": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    try:
        from fused_margin.backends import extension

        info["cpu_kernel_isa"] = extension.cpu_kernel_isa()
    except (ImportError, AttributeError):
        info["cpu_kernel_isa"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["name"] = props.name
    else:
        info["name"] = info["cpu"]
    return info


# -- table -------------------------------------------------------------------------------------------


def _fmt_ms(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _fmt_mib(value) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3g}"


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def format_table(run) -> str:
    """The terminal table: one line per timed (or failed) case and mode, then skips and failures."""
    cfg = run.config
    gpu = run.machine["device"] == "cuda"
    header = (
        ("case", "backend", "mode", "ms")
        + (("wall ms",) if gpu else ())
        + ("vs eager", "x floor", "peak MiB", "check", "note")
    )
    lines = []
    for r in run.rows:
        if r["mode"] is None:
            continue
        wall = (_fmt_ms(r["wall_ms"]),) if gpu else ()
        lines.append(
            (r["group"], r["backend"], r["mode"], _fmt_ms(r["ms"]))
            + wall
            + (
                _fmt(r["speedup_vs_eager"], ".2f", "x"),
                _fmt(r["x_gemm_floor"], ".2f"),
                _fmt_mib(r["peak_extra_mib"]),
                r["check"] or "-",
                r["note"] or "",
            )
        )
    widths = [max(len(str(row[i])) for row in [header] + lines) for i in range(len(header))]
    numeric = set(range(3, len(header) - 2))

    def fmt_line(row):
        cells = [str(c).rjust(w) if i in numeric else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    m = run.machine
    where = (
        f"{m['cpu_count']} cores, {m['torch_threads']} torch threads"
        if m["device"] == "cpu"
        else f"{m.get('gpu_memory_gib')} GiB"
    )
    title = (
        f"fused_margin benchmark: B={cfg.B} D={cfg.D} C={cfg.C} {cfg.dtype} on {m['name']} "
        f"({m['device']}, {where}; torch {m['torch']}, triton {m['triton']})"
    )
    timing = TIMING_METHOD[m["device"]] + ("; wall ms: loop wall time per call (fwd, fwdbwd)" if gpu else "")
    if getattr(cfg, "rounds", 1) > 1:
        timing += (
            f"; {cfg.rounds} rounds (every case timed once a round, in one order): ms is the median of the "
            "rounds' medians, vs eager and x floor the medians of each round's ratios"
        )
    out = [
        title,
        f"time: {timing}",
        f"memory: {run.memory_method}",
        f"check: {CHECK_RULE} (check rows: {run.check_rows} of {cfg.B})",
        "",
        fmt_line(header),
        fmt_line(["-" * w for w in widths]),
    ]
    out += [fmt_line(row) for row in lines]
    failures = [r for r in run.rows if r["mode"] is not None and r["check"] not in ("ok", "n/a")]
    seen = set()
    details = []
    for r in failures:
        key = (r["group"], r["backend"])
        if key not in seen:
            seen.add(key)
            details.append(f"  {r['group']} {r['backend']}: {r['check']}: {r['check_detail']}")
    if details:
        out += ["", "not timed or failed:"] + details
    skipped: Dict[tuple, List[str]] = {}
    for r in run.rows:
        if r["mode"] is None:
            skipped.setdefault((r["backend"], r["check_detail"]), []).append(r["group"])
    if skipped:
        margin_groups = list(dict.fromkeys(r["group"] for r in run.rows if r["kind"] == "margin"))
        out += ["", "skipped:"]
        for (backend, reason), where in skipped.items():
            scope = "every loss" if len(where) > 1 and where == margin_groups else ", ".join(where)
            out.append(f"  {backend} ({scope}): {reason}")
    if getattr(run, "interrupted", False):
        out += [
            "",
            "INTERRUPTED: the run was stopped early (Ctrl-C or a time limit); the cases above are the ones "
            "measured, the rest did not run",
        ]
    return "\n".join(out)


# -- files -------------------------------------------------------------------------------------------


def _config_dict(cfg) -> dict:
    data = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    data["row_kernels"] = sorted(cfg.row_kernels)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_json(run, path: Path) -> None:
    payload = {
        "machine": run.machine,
        "config": _config_dict(run.config),
        "command": run.command,
        "timing_method": TIMING_METHOD[run.machine["device"]],
        "memory_method": run.memory_method,
        "check_rule": CHECK_RULE,
        "check_rows": run.check_rows,
        "wall_s": round(run.wall_s, 1),
        "interrupted": bool(getattr(run, "interrupted", False)),
        "rows": [{k: _clean(v) for k, v in r.items()} for r in run.rows],
    }
    path.write_text(json.dumps(payload, indent=1) + "\n")


MACHINE_COLUMNS = ("machine", "device", "torch", "triton")


def write_csv(run, path: Path) -> None:
    from fused_margin.bench.runner import FIELDS

    m = run.machine
    machine = {"machine": m["name"], "device": m["device"], "torch": m["torch"], "triton": m["triton"]}
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(FIELDS) + list(MACHINE_COLUMNS))
        writer.writeheader()
        for r in run.rows:
            writer.writerow({**{k: ("" if v is None else v) for k, v in r.items()}, **machine})


def _palette(names: List[str]) -> Dict[str, str]:
    fixed = {
        "reference": "#7f7f7f",
        "compile": "#9467bd",
        "triton": "#1f77b4",
        "cuda": "#2ca02c",
        "cpu": "#17becf",
        "torch-ce": "#bcbd22",
        "liger": "#e377c2",
        "cce": "#8c564b",
        "floor": "#000000",
    }
    extra = ["#ff7f0e", "#d62728", "#aec7e8", "#98df8a"]
    out = {}
    for name in names:
        out[name] = fixed.get(name) or extra[len([n for n in out if n not in fixed]) % len(extra)]
    return out


def write_plot(run, path: Path) -> None:
    """Time and peak extra memory per case, one row of two panels per mode (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = run.config
    modes = list(cfg.modes)
    per_mode = {mode: [r for r in run.rows if r["mode"] == mode] for mode in modes}
    height = max(len(rows) for rows in per_mode.values()) if per_mode else 1
    fig, axes = plt.subplots(
        len(modes),
        2,
        figsize=(13, 0.9 + 0.36 * height * len(modes) + 0.6 * len(modes)),
        squeeze=False,
        gridspec_kw={"width_ratios": [1.4, 1]},
    )
    colors = _palette(sorted({r["backend"] for r in run.rows}))
    for (ax_t, ax_m), mode in zip(axes, modes):
        rows = per_mode[mode][::-1]
        labels = [f"{r['group']}  {r['backend']}" for r in rows]
        ypos = range(len(rows))
        times = [r["ms"] or 0.0 for r in rows]
        mems = [r["peak_extra_mib"] or 0.0 for r in rows]
        bar_colors = [colors[r["backend"]] for r in rows]
        ax_t.barh(ypos, times, color=bar_colors)
        ax_m.barh(ypos, mems, color=bar_colors)
        ax_t.set_yticks(list(ypos), labels, fontsize=8)
        ax_m.set_yticks(list(ypos), [""] * len(rows))
        top_t, top_m = max(times + [1e-9]), max(mems + [1e-9])
        for y, r in zip(ypos, rows):
            if r["ms"] is None:
                ax_t.text(0, y, f" {r['check']}", va="center", fontsize=8, color="#d62728", fontweight="bold")
                continue
            extra = f"  {r['speedup_vs_eager']:.2f}x" if r["speedup_vs_eager"] is not None else ""
            ax_t.text(r["ms"] + 0.01 * top_t, y, f"{_fmt_ms(r['ms'])}{extra}", va="center", fontsize=7)
            if r["peak_extra_mib"] is not None:
                ax_m.text(r["peak_extra_mib"] + 0.01 * top_m, y, _fmt_mib(r["peak_extra_mib"]), va="center", fontsize=7)
        floor = next((r["ms"] for r in rows if r["kind"] == "floor" and r["ms"] is not None), None)
        if floor is not None:
            ax_t.axvline(floor, color="black", linestyle="--", linewidth=0.8)
            ax_t.text(floor, len(rows) - 0.4, " GEMM floor", fontsize=7, va="bottom")
        ax_t.set_xlim(0, top_t * 1.25)
        ax_m.set_xlim(0, top_m * 1.2)
        ax_t.set_xlabel(f"{mode}: ms per call (median; label: ms, speed-up over eager)", fontsize=8)
        ax_m.set_xlabel(f"{mode}: peak extra memory (MiB)", fontsize=8)
        for ax in (ax_t, ax_m):
            ax.tick_params(axis="x", labelsize=7)
            ax.grid(axis="x", alpha=0.3)
            ax.set_ylim(-0.6, len(rows) - 0.4 + (0.5 if floor is not None else 0))
    m = run.machine
    fig.suptitle(
        f"fused_margin: B={cfg.B} D={cfg.D} C={cfg.C} {cfg.dtype}, {m['name']} (torch {m['torch']})", fontsize=10
    )
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(run, out_dir: Path, plot: bool = True) -> Dict[str, Path]:
    """Write ``results.json``, ``results.csv``, ``table.txt`` and (``plot``) ``results.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "csv": out_dir / "results.csv", "table": out_dir / "table.txt"}
    write_json(run, paths["json"])
    write_csv(run, paths["csv"])
    paths["table"].write_text(format_table(run) + "\n")
    if plot and importlib.util.find_spec("matplotlib") is None:
        print("[bench] matplotlib is not installed: no results.png (pip install matplotlib)", file=sys.stderr)
    elif plot:
        paths["png"] = out_dir / "results.png"
        write_plot(run, paths["png"])
    return paths
