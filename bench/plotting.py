"""Small helpers shared by the benchmarks: steady-state figures, markdown tables, JSON results,
line-plot PNGs.

Nothing here knows about any particular benchmark. matplotlib is imported lazily (Agg backend),
so benchmarks that never draw do not need it.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
from pathlib import Path


def fmt(value, spec: str = ".4g", missing: str = "-") -> str:
    """Format a number for a table cell; None / NaN become `missing`, strings pass through."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if isinstance(value, str):
        return value
    return format(value, spec)


def steady_part(items: list, warmup: int) -> list:
    """What a run measured after its warm-up steps (all of it, if it was no longer than that)."""
    return items[warmup:] or items


def steady_tokens_per_s(step_times: list[float], warmup: int, tokens_per_step: int) -> float:
    times = steady_part(step_times, warmup)
    return tokens_per_step * len(times) / sum(times) if times else 0.0


def markdown_table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A GitHub markdown table. `align` is one letter per column: l, r or c (default: l then r)."""
    align = align or "l" + "r" * (len(headers) - 1)
    marks = {"l": ":--", "r": "--:", "c": ":-:"}
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(items):
        return "| " + " | ".join(s.ljust(w) if a == "l" else s.rjust(w)
                                 for s, w, a in zip(items, widths, align)) + " |"

    sep = "| " + " | ".join(marks[a].rjust(w, "-") if a == "r" else marks[a].ljust(w, "-")
                            for w, a in zip(widths, align)) + " |"
    return "\n".join([line(headers), sep] + [line(r) for r in cells])


def _jsonable(obj):
    """Non-finite floats become None (strict JSON); tuples become lists; paths become strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path, obj) -> Path:
    """Write `obj` as strict, indented JSON, creating parent folders; atomic (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def machine_info(device=None) -> dict:
    """Where a result was measured: versions, CPU count, accelerator name."""
    import torch

    info = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": str(device) if device is not None else "cpu"}
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def line_plot(path, panels: list[dict], title: str | None = None, panel_size=(6.0, 4.2)) -> Path:
    """Write a PNG with one subplot per panel, side by side.

    A panel: {"title", "xlabel", "ylabel", "series": [{"label", "x", "y", optional "style": dict of
    matplotlib kwargs}, optional "labels": one text per point, drawn beside it], optional "logx"/"logy":
    bool, "ylim": (lo, hi), "hline": y, "vline": x, "xticks": [...], "xticklabels": [...]}.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(panel_size[0] * len(panels), panel_size[1]), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for s in panel["series"]:
            ax.plot(s["x"], s["y"], label=s.get("label"), **s.get("style", {}))
            for x, y, text in zip(s["x"], s["y"], s.get("labels", [])):
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        if panel.get("hline") is not None:
            ax.axhline(panel["hline"], color="grey", lw=0.8, ls=":")
        if panel.get("vline") is not None:
            ax.axvline(panel["vline"], color="grey", lw=0.8, ls=":")
        ax.set_title(panel.get("title", ""))
        ax.set_xlabel(panel.get("xlabel", ""))
        ax.set_ylabel(panel.get("ylabel", ""))
        if panel.get("logx"):
            ax.set_xscale("log")
        if panel.get("logy"):
            ax.set_yscale("log")
        if panel.get("ylim"):
            ax.set_ylim(*panel["ylim"])
        if panel.get("xticks") is not None:
            ax.set_xticks(panel["xticks"], panel.get("xticklabels") or [str(t) for t in panel["xticks"]])
            ax.minorticks_off()
        ax.grid(alpha=0.3)
        if any(s.get("label") for s in panel["series"]):
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
