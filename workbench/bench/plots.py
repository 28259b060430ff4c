"""Figures of the throughput lab (matplotlib): measured against modelled, the sweeps, device predictions."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plt():
    import matplotlib.pyplot as plt  # lazily: the harness runs without matplotlib

    return plt


SWEEP_X = {"tokens": ("tokens", "tokens per step"), "granularity": ("num_experts", "experts (top-k and hidden scaled)"),
           "top_k": ("top_k", "top-k"), "capacity_factor": ("capacity_factor", "capacity factor")}


def plot_measured_vs_modelled(df, ax=None, title: str = "step time: measured vs analytic model"):
    """Log-log scatter of measured median step time against the model's, one colour per kind of
    measurement; the diagonal is a perfect model."""
    plt = _plt()
    ax = ax or plt.subplots(figsize=(5, 4.5))[1]
    df = df[df["model_step_s"].notna()]
    groups = df.assign(group=df.get("sweep").fillna(df["kind"]) if "sweep" in df else df["kind"]).groupby("group")
    for name, g in groups:
        ax.scatter(g["step_s_median"] * 1e3, g["model_step_s"] * 1e3, label=str(name), s=18)
    lo = min(df["step_s_median"].min(), df["model_step_s"].min()) * 1e3 / 1.5
    hi = max(df["step_s_median"].max(), df["model_step_s"].max()) * 1e3 * 1.5
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="model = measured")
    ax.set(xscale="log", yscale="log", xlabel="measured ms", ylabel="modelled ms", title=title)
    ax.legend(fontsize=7)
    return ax


def plot_sweeps(df, axes=None):
    """One panel per sweep: measured and modelled tokens/s against the swept quantity."""
    plt = _plt()
    sweeps = [s for s in SWEEP_X if "sweep" in df and (df["sweep"] == s).any()]
    if axes is None:
        fig, axes = plt.subplots(1, max(1, len(sweeps)), figsize=(4 * max(1, len(sweeps)), 3.2), squeeze=False)
        axes = axes[0]
    for ax, s in zip(axes, sweeps, strict=False):
        g = df[df["sweep"] == s].sort_values(SWEEP_X[s][0])
        x = g[SWEEP_X[s][0]]
        ax.plot(x, g["tokens_per_s"], "o-", label="measured")
        ax.plot(x, g["tokens"] / g["model_step_s"], "s--", label="model")
        ax.set(xlabel=SWEEP_X[s][1], ylabel="tokens/s", title=f"sweep: {s}")
        if s in ("tokens", "granularity"):
            ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    return axes


def plot_predictions(table, ax=None, metric: str = "tokens_per_s", title: str = "predicted training throughput"):
    """Grouped bars of a prediction table (``perfmodel`` rows with ``shape``, ``device``, ``low``,
    ``value``, ``high`` of ``metric``): the bar at the table's value, the whisker over the band."""
    import numpy as np

    plt = _plt()
    ax = ax or plt.subplots(figsize=(9, 3.8))[1]
    shapes = list(dict.fromkeys(table["shape"]))
    devices = list(dict.fromkeys(table["device"]))
    width = 0.8 / len(devices)
    for j, dev in enumerate(devices):
        rows = table[table["device"] == dev].set_index("shape").reindex(shapes)
        x = np.arange(len(shapes)) + j * width
        v = rows[f"{metric}_value"].to_numpy(float)
        lo, hi = rows[f"{metric}_low"].to_numpy(float), rows[f"{metric}_high"].to_numpy(float)
        ax.bar(x, v, width, label=dev)
        ax.errorbar(x, v, yerr=[np.maximum(v - np.minimum(lo, hi), 0), np.maximum(np.maximum(lo, hi) - v, 0)],
                    fmt="none", ecolor="k", capsize=2, lw=0.8)
    ax.set_xticks(np.arange(len(shapes)) + 0.4 - width / 2, shapes, rotation=15, fontsize=8)
    ax.set(ylabel=metric.replace("_", " ") + " per device", title=title, yscale="log")
    ax.legend(fontsize=7, ncol=len(devices))
    return ax


def throughput_figure(df, path: str | Path | None = None, title: str = ""):
    """The CLI's figure: measured against modelled, and the sweeps; saved to ``path`` when given."""
    plt = _plt()
    sweeps = [s for s in SWEEP_X if "sweep" in df and (df["sweep"] == s).any()]
    fig, axes = plt.subplots(1, 1 + len(sweeps), figsize=(4.2 * (1 + len(sweeps)), 3.6), squeeze=False)
    plot_measured_vs_modelled(df, axes[0][0])
    if sweeps:
        plot_sweeps(df, axes[0][1:])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig


def prediction_table(shapes: list[str], devices: list[str], *, ep: int = 8, tokens: int | None = None,
                     dtype: str = "bf16", device_table: dict[str, Any] | None = None, **kw: Any):
    """Predictions of every shape on every device at the three ends of the device bands (pandas)."""
    import pandas as pd

    from workbench.bench import perfmodel as pm

    table = device_table or pm.load_devices()
    rows = []
    for s in shapes:
        shp = pm.shape(s)
        for d in devices:
            row: dict[str, Any] = {"shape": shp.name, "device": d}
            for end in pm.BAND_ENDS:
                p = pm.predict(shp, table[d], tokens=tokens, ep=ep, dtype=dtype, end=end, **kw)
                row.update({f"tokens_per_s_{end}": p.tokens_per_s, f"mfu_{end}": p.mfu, f"tflops_{end}": p.tflops,
                            f"a2a_share_{end}": p.parts_s["all_to_all"] / p.step_s})
            rows.append(row)
    return pd.DataFrame(rows)
