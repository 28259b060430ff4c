"""Matplotlib figures and ipywidgets panels used by the notebooks and the training report.

Every plot takes plain data (the trainer's history rows, tensors, lists) and an optional
``ax``, so notebooks can compose them; matplotlib and ipywidgets are imported lazily.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def _plt():
    try:
        import matplotlib.pyplot as plt  # headless machines fall back to the Agg backend by themselves
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise ImportError("plots need matplotlib: pip install 'moe-workbench[notebooks]'") from err
    return plt


def _axes(ax, figsize=(6, 3.5)):
    if ax is not None:
        return ax.figure, ax
    fig, ax = _plt().subplots(figsize=figsize)
    return fig, ax


def moe_layers_in(history: Sequence[dict[str, Any]]) -> list[int]:
    """Indices of the MoE layers that the history rows report (keys ``L<i>/...``)."""
    if not history:
        return []
    return sorted({int(k[1:].split("/")[0]) for k in history[-1] if k.startswith("L") and "/" in k})


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_losses(history: Sequence[dict[str, Any]], ax=None, smoothing: int = 10):
    """Training loss (raw and smoothed) and validation loss per domain, against step."""
    fig, ax = _axes(ax)
    steps = [r["step"] for r in history]
    lm = [r["lm_loss"] for r in history]
    ax.plot(steps, lm, color="0.8", lw=0.8, label="train (per step)")
    ax.plot(steps, smooth(lm, smoothing), color="k", lw=1.5, label=f"train ({smoothing}-step mean)")
    val_keys = sorted({k for r in history for k in r if k.startswith("val/") and k != "val/loss"})
    for key in val_keys:
        pts = [(r["step"], r[key]) for r in history if key in r]
        ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title("loss")
    ax.legend(fontsize=7)
    return fig


def plot_max_vio(history: Sequence[dict[str, Any]], ax=None, smoothing: int = 10):
    """MaxVio (max load / mean load - 1) of every MoE layer against step."""
    fig, ax = _axes(ax)
    steps = [r["step"] for r in history]
    for layer in moe_layers_in(history):
        ax.plot(steps, smooth([r[f"L{layer}/max_vio"] for r in history], smoothing), label=f"layer {layer}")
    ax.set_xlabel("step")
    ax.set_ylabel("MaxVio")
    ax.set_title(f"load imbalance ({smoothing}-step mean)")
    ax.legend(fontsize=7)
    return fig


def plot_load_over_time(history: Sequence[dict[str, Any]], layer: int, ax=None):
    """Heatmap of each expert's load (relative to uniform: 1 = its fair share) against step."""
    fig, ax = _axes(ax)
    frac = torch.tensor([r[f"L{layer}/load_fraction"] for r in history])  # (steps, E)
    E = frac.shape[1]
    steps = [r["step"] for r in history]
    im = ax.imshow((frac * E).T.numpy(), aspect="auto", cmap="RdBu_r", vmin=0, vmax=2, interpolation="nearest",
                   extent=(steps[0] - 0.5, steps[-1] + 0.5, E - 0.5, -0.5))
    ax.set_xlabel("step")
    ax.set_ylabel("expert")
    ax.set_title(f"layer {layer}: load / uniform")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    return fig


def plot_domain_expert(matrix_DE: torch.Tensor, domains: Sequence[str], ax=None, title: str = "",
                       normalize: bool = True):
    """Domain x expert routing: each row is the share of that domain's assignments per expert."""
    fig, ax = _axes(ax)
    m = matrix_DE.double()
    if normalize:
        m = m / m.sum(dim=1, keepdim=True).clamp(min=1)
    im = ax.imshow(m.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(domains)), list(domains), fontsize=8)
    ax.set_xlabel("expert")
    ax.set_title(title or "domain x expert (share of domain's tokens)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    return fig


def plot_expert_load(tokens_per_expert: Sequence[float], ax=None, gate_mass: Sequence[float] | None = None,
                     title: str = "load per expert"):
    """Bars of each expert's share of assignments (and of gate weight, when given); the
    dashed line is the uniform share."""
    fig, ax = _axes(ax)
    load = torch.tensor(tokens_per_expert, dtype=torch.float64)
    share = load / load.sum().clamp(min=1)
    E = len(share)
    xs = torch.arange(E).double()
    width = 0.4 if gate_mass is not None else 0.8
    ax.bar((xs - width / 2 if gate_mass is not None else xs).numpy(), share.numpy(), width, label="assignments")
    if gate_mass is not None:
        ax.bar((xs + width / 2).numpy(), list(gate_mass), width, label="gate mass")
        ax.legend(fontsize=7)
    ax.axhline(1 / E, color="k", ls="--", lw=0.8)
    ax.set_xlabel("expert")
    ax.set_ylabel("share")
    ax.set_title(title)
    return fig


def plot_token_routing(token_strings: Sequence[str], expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                       num_experts: int, ax=None, title: str = ""):
    """Token x expert grid: cell (t, e) is the combine weight token t gives expert e."""
    T = len(token_strings)
    grid = torch.zeros(T, num_experts)
    grid.scatter_(1, expert_ids_TK.cpu(), weights_TK.detach().float().cpu())
    fig, ax = _axes(ax, figsize=(max(6, T * 0.22), 3.5))
    im = ax.imshow(grid.T.numpy(), aspect="auto", cmap="Blues", interpolation="nearest")
    ax.set_xticks(range(T), list(token_strings), fontsize=7, rotation=90)
    ax.set_ylabel("expert")
    ax.set_title(title or "routing of each token (combine weight)")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    return fig


def training_report(history: Sequence[dict[str, Any]], eval_result: Any, path: str | Path | None = None,
                    max_layers: int = 4):
    """The run's report: loss curves, MaxVio, per-layer load over time, domain x expert matrices."""
    plt = _plt()
    layers = moe_layers_in(history)[:max_layers]
    cols = max(2, len(layers))
    rows = 3 if layers else 1
    fig = plt.figure(figsize=(4.2 * cols, 3.4 * rows), constrained_layout=True)
    grid = fig.add_gridspec(rows, cols)
    half = cols // 2
    plot_losses(history, fig.add_subplot(grid[0, :half] if layers else grid[0, :]))
    if layers:
        plot_max_vio(history, fig.add_subplot(grid[0, half:]))
        for j, layer in enumerate(layers):
            plot_load_over_time(history, layer, fig.add_subplot(grid[1, j]))
        if eval_result is not None:
            moe_layer_ids = moe_layers_in(history)
            for j, layer in enumerate(layers):
                plot_domain_expert(eval_result.routing_matrix[moe_layer_ids.index(layer)], eval_result.domains,
                                   fig.add_subplot(grid[2, j]),
                                   title=f"layer {layer}: domain x expert (step {eval_result.step})")
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


class LiveLossPlot:
    """A ``Trainer.fit`` callback that redraws the loss and MaxVio curves every ``every`` steps
    in a notebook (one display area, updated in place); silent outside IPython."""

    def __init__(self, every: int = 10, smoothing: int = 10):
        self.every, self.smoothing = every, smoothing
        self._handle = None

    def __call__(self, trainer, row: dict[str, Any]) -> None:
        last = trainer.step == trainer.cfg.steps
        if trainer.step % self.every and not last:
            return
        try:
            from IPython.display import display
        except ImportError:
            return
        plt = _plt()
        moe = bool(moe_layers_in(trainer.history))
        fig, axes = plt.subplots(1, 2 if moe else 1, figsize=(11 if moe else 6, 3.3), squeeze=False)
        plot_losses(trainer.history, axes[0, 0], self.smoothing)
        if moe:
            plot_max_vio(trainer.history, axes[0, 1], self.smoothing)
        fig.suptitle(f"step {trainer.step} / {trainer.cfg.steps}", fontsize=9)
        if self._handle is None:
            self._handle = display(fig, display_id=True)
        else:
            self._handle.update(fig)
        plt.close(fig)


def _widgets():
    try:
        import ipywidgets as widgets
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise ImportError("widgets need ipywidgets: pip install 'moe-workbench[notebooks]'") from err
    return widgets


def redraw_on_change(plot: Callable[..., Any], controls: dict[str, Any]):
    """A panel of ``controls`` (name -> ipywidgets control) above an output area in which
    ``plot(**values)`` draws again each time a control's value changes. Like any widget, the
    panel shows when it is a cell's result (or passed to ``display``).

    Nothing is drawn when the panel is built: the notebook calls ``plot`` once directly for the
    first view (so a headless run exercises the same code). Drawing into an Output widget during a
    headless run is what makes the notebook client send on the kernel's shell socket while it waits
    for the cell's reply, which can lose the reply's wake-up (jupyter/nbclient#312); ``interact``
    and ``interactive_output`` draw at once, so they are not used here.
    """
    widgets = _widgets()
    from ipywidgets.widgets.interaction import show_inline_matplotlib_plots

    out = widgets.Output()

    def redraw(change=None):
        with out:
            out.clear_output(wait=True)
            plot(**{name: control.value for name, control in controls.items()})
            show_inline_matplotlib_plots()  # figures the plot made but did not show

    for control in controls.values():
        control.observe(redraw, names="value")
    return widgets.VBox([widgets.HBox(list(controls.values())), out])


def layer_picker(plot: Callable[[int], Any], layers: Sequence[int], description: str = "layer",
                 value: int | None = None):
    """A dropdown of ``layers`` (starting at ``value``, default the first) that draws ``plot(layer)``
    below itself when the choice changes; call ``plot`` once directly for the first view."""
    widgets = _widgets()
    start = layers[0] if value is None else value
    return redraw_on_change(plot, {"layer": widgets.Dropdown(options=list(layers), value=start,
                                                             description=description)})


# --- routers side by side (notebooks/01_routers.ipynb) -----------------------------------


def plot_gate_histogram(gates: torch.Tensor | Sequence[float] | dict[str, torch.Tensor | Sequence[float]], ax=None,
                        bins: int = 40, title: str = "gate weights"):
    """Histogram of the combine weights of real assignments, one outline per entry of a dict
    (e.g. ``{"init": ..., "trained": ...}``), as a density so batches of any size compare."""
    fig, ax = _axes(ax)
    series = gates if isinstance(gates, dict) else {"": gates}
    values = {label: torch.as_tensor(g, dtype=torch.float64).flatten() for label, g in series.items()}
    top = max([1.0] + [float(v.max()) for v in values.values() if v.numel()])
    for label, v in values.items():
        if v.numel():
            ax.hist(v.numpy(), bins=bins, range=(0.0, top), density=True, histtype="step", lw=1.4,
                    label=label or None)
    ax.set_xlabel("gate weight")
    ax.set_ylabel("density")
    ax.set_title(title)
    if any(values) and len(values) > 1:
        ax.legend(fontsize=7)
    return fig


def router_panel_data(routing: Any, layer: int, sequence: int = 0, length: int | None = 48) -> dict[str, Any]:
    """Keyword arguments for ``plot_router_panel`` from a ``workbench.analysis.BatchRouting``: the
    first ``length`` tokens of ``sequence`` (token x expert weights; padding slots weigh 0) and the
    whole batch's load, gate mass and gates in MoE layer ``layer``."""
    from workbench.data import ByteTokenizer

    info, m = routing.layer_info(layer), routing.layer_metrics(layer)
    B, S = routing.tokens.shape
    if not 0 <= sequence < B:
        raise ValueError(f"sequence={sequence!r} is invalid: the batch has {B} sequences")
    n = S if length is None else min(length, S)
    rows = slice(sequence * S, sequence * S + n)
    weights_TK = info.router_output.weights_TK
    if info.router_output.mask_TK is not None:
        weights_TK = weights_TK * info.router_output.mask_TK
    return {
        "token_strings": ByteTokenizer().token_strings(routing.tokens[sequence, :n]),
        "expert_ids_TK": info.router_output.expert_ids_TK[rows].cpu(),
        "weights_TK": weights_TK[rows].float().cpu(),
        "num_experts": routing.num_experts,
        "tokens_per_expert": m["tokens_per_expert"],
        "gate_mass": m["gate_mass"],
        "gates": routing.gates(layer),
        "capacity": m["capacity"],
        "dropped_fraction": m["dropped_fraction"],
        "max_vio": m["max_vio"],
    }


def plot_router_panel(token_strings: Sequence[str], expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                      num_experts: int, tokens_per_expert: Sequence[float], gate_mass: Sequence[float],
                      gates: torch.Tensor | Sequence[float], capacity: int | None = None,
                      dropped_fraction: float | None = None, max_vio: float | None = None, title: str = "",
                      axes=None):
    """One router on one batch, three panels: the token x expert combine weights of a slice of
    tokens, the load and gate mass per expert (dotted red: the capacity, above it assignments
    are dropped), and the histogram of gate weights. ``axes``: three matplotlib axes, or None."""
    if axes is None:
        plt = _plt()
        fig, axes = plt.subplots(1, 3, figsize=(15, 2.9), gridspec_kw={"width_ratios": [3, 1.3, 1.2]},
                                 constrained_layout=True)
    left, middle, right = axes
    plot_token_routing(token_strings, expert_ids_TK, weights_TK, num_experts, ax=left,
                       title=f"{title}: combine weight per token".lstrip(": "))
    facts = []
    if max_vio is not None:
        facts.append(f"MaxVio {max_vio:.2f}")
    if dropped_fraction is not None:
        facts.append(f"dropped {dropped_fraction:.1%}")
    plot_expert_load(tokens_per_expert, ax=middle, gate_mass=gate_mass, title=", ".join(facts) or "load per expert")
    from matplotlib.ticker import MaxNLocator

    middle.xaxis.set_major_locator(MaxNLocator(integer=True))
    total = float(sum(tokens_per_expert))
    if capacity is not None and total > 0:
        middle.axhline(capacity / total, color="tab:red", ls=":", lw=1.2)
    plot_gate_histogram(gates, ax=right, title="gate weights")
    return left.figure


def plot_router_rows(rows: dict[str, dict[str, Any]], title: str = ""):
    """``plot_router_panel`` once per entry of ``rows`` (label -> its keyword arguments), one row
    each, e.g. the same router at initialisation and after training."""
    plt = _plt()
    fig, axes = plt.subplots(len(rows), 3, figsize=(15, 2.8 * len(rows)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1.3, 1.2]}, constrained_layout=True)
    for row_axes, (label, kwargs) in zip(axes, rows.items(), strict=True):
        plot_router_panel(**kwargs, title=label, axes=row_axes)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_metric_bars(names: Sequence[str], series: dict[str, Sequence[float]], ax=None, ylabel: str = "",
                     title: str = "", ylim: tuple[float, float] | None = None, legend: bool = True):
    """Grouped bars: one group per name, one bar per series (e.g. ``{"init": ..., "trained": ...}``).
    ``ylim`` zooms the value axis (say so in the label: the bars then do not start at zero)."""
    fig, ax = _axes(ax, figsize=(max(6, 0.6 * len(names)), 3))
    n = max(1, len(series))
    width = 0.8 / n
    xs = torch.arange(len(names)).double()
    for i, (label, values) in enumerate(series.items()):
        ax.bar((xs - 0.4 + width * (i + 0.5)).numpy(), [float(v) for v in values], width, label=label)
    ax.set_xticks(range(len(names)), list(names), rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if legend and len(series) > 1:
        ax.legend(fontsize=7)
    return fig


def router_picker(show: Callable[..., Any], routers: Sequence[str], num_experts: Sequence[int],
                  top_k: Sequence[int], value: tuple[str, int, int] | None = None):
    """Dropdowns for router, number of experts and top-k (starting at ``value``, default the first
    of each) that draw ``show(router, num_experts, top_k)`` below themselves when a choice changes;
    call ``show`` once directly with ``value`` for the first view."""
    widgets = _widgets()
    router0, experts0, k0 = value if value is not None else (routers[0], num_experts[0], top_k[0])
    return redraw_on_change(show, {
        "router": widgets.Dropdown(options=list(routers), value=router0, description="router"),
        "num_experts": widgets.Dropdown(options=list(num_experts), value=experts0, description="experts"),
        "top_k": widgets.Dropdown(options=list(top_k), value=k0, description="top-k"),
    })


# --- load-balancing lab (notebooks/02_load_balancing.ipynb) ---------------------------------
# These take the tables of ``workbench.experiments.Results`` (pandas DataFrames) and its
# per-run lists; means and spreads are over seeds.


def plot_load_heatmap(load_fraction_SE: Sequence[Sequence[float]], ax=None, title: str = ""):
    """Expert x step heatmap of each expert's share of the assignments at every training step:
    collapse shows as a few bright rows taking over; uniform routing is one flat colour (1/E)."""
    fig, ax = _axes(ax)
    m = torch.tensor(load_fraction_SE, dtype=torch.float64).T  # (E, steps)
    E = m.shape[0]
    im = ax.imshow(m.numpy(), aspect="auto", cmap="magma", interpolation="nearest", vmin=0,
                   vmax=max(2.0 / E, float(m.max())), extent=(0.5, m.shape[1] + 0.5, E - 0.5, -0.5))
    ax.set_xlabel("step")
    ax.set_ylabel("expert")
    ax.set_title(title or "share of assignments per expert")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    return fig


def plot_load_by_layer(load_fraction: dict[str, Sequence[Sequence[float]]], title: str = ""):
    """``plot_load_heatmap`` for every MoE layer of one run, side by side."""
    layers = sorted(load_fraction, key=int)
    fig, axes = _plt().subplots(1, len(layers), figsize=(3.6 * len(layers), 2.8), squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        plot_load_heatmap(load_fraction[layer], ax=ax, title=f"layer {layer}")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_runs_over_steps(steps: Any, metric: str, names: Sequence[str] | None = None, ax=None,
                         smoothing: int = 10, ylabel: str = "", title: str = "", logy: bool = False):
    """``metric`` against step, one line per experiment: the mean over seeds (smoothed with a
    trailing window of ``smoothing`` steps) and a band from the lowest to the highest seed."""
    fig, ax = _axes(ax, figsize=(7, 3.5))
    names = list(dict.fromkeys(steps["name"])) if names is None else list(names)
    for name in names:
        rows = steps[steps["name"] == name]
        if metric not in rows or rows[metric].isna().all():
            continue
        table = rows.pivot_table(index="step", columns="seed", values=metric)
        smoothed = table.apply(lambda col: smooth(col.tolist(), smoothing))
        mean = smoothed.mean(axis=1)
        line = ax.plot(table.index, mean, label=name, lw=1.3)[0]
        if table.shape[1] > 1:
            ax.fill_between(table.index, smoothed.min(axis=1), smoothed.max(axis=1), color=line.get_color(),
                            alpha=0.15, lw=0)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel or metric)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    return fig


def plot_pareto(runs: Any, x: str = "max_vio_global", y: str = "val_loss", by: str = "name",
                color_by: str | None = "family", ax=None, title: str = ""):
    """Each experiment at its mean (``x``, ``y``) over seeds, with error bars of one standard
    deviation on both axes; lower-left is better on both. Points are coloured by ``color_by``."""
    fig, ax = _axes(ax, figsize=(7, 4.5))
    stats = runs.groupby(by, sort=False).agg(x_mean=(x, "mean"), x_std=(x, "std"), y_mean=(y, "mean"),
                                            y_std=(y, "std"))
    groups = runs.groupby(by, sort=False)[color_by].first() if color_by in runs else None
    colors: dict[Any, Any] = {}
    palette = _plt().rcParams["axes.prop_cycle"].by_key()["color"]
    for name, row in stats.iterrows():
        group = groups[name] if groups is not None else name
        color = colors.setdefault(group, palette[len(colors) % len(palette)])
        ax.errorbar(row.x_mean, row.y_mean, xerr=row.x_std if row.x_std == row.x_std else None,
                    yerr=row.y_std if row.y_std == row.y_std else None, fmt="o", color=color, ms=5, capsize=2,
                    label=group if list(colors).count(group) == 1 and group not in ax.get_legend_handles_labels()[1]
                    else None)
        ax.annotate(str(name), (row.x_mean, row.y_mean), fontsize=6.5, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel(f"{x} (mean ± std over seeds)")
    ax.set_ylabel(f"{y} (mean ± std over seeds)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return fig


def plot_bias_trajectories(bias_SE: Sequence[Sequence[float]], ax=None, title: str = ""):
    """The loss-free router bias of every expert against step (one line per expert)."""
    fig, ax = _axes(ax)
    b = torch.tensor(bias_SE, dtype=torch.float64)
    steps = torch.arange(1, b.shape[0] + 1)
    for e in range(b.shape[1]):
        ax.plot(steps.numpy(), b[:, e].numpy(), lw=1, label=f"expert {e}")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("bias added to the selection score")
    ax.set_title(title or "loss-free bias per expert")
    ax.legend(fontsize=6, ncol=2)
    return fig


def plot_capacity_tradeoff(runs: Any, metrics: Sequence[tuple[str, str]] = (
        ("dropped_fraction", "dropped assignments (fraction)"), ("val_loss", "validation loss"),
        ("step_time_s", "step time (s, median)"))):
    """Each metric against the capacity factor, one line per drop policy (mean ± std over
    seeds), and the dropless dispatch as a dashed line with its spread as a band."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.2), squeeze=False)
    # the dropless run has no capacity: it is drawn as a reference line where it has the metric
    capped = runs[runs["drop_policy"] != "none"]
    dropless = runs[runs["drop_policy"] == "none"]
    for ax, (metric, label) in zip(axes[0], metrics, strict=True):
        for policy, rows in capped.groupby("drop_policy", sort=False):
            stats = rows.groupby("capacity_factor")[metric].agg(["mean", "std"])
            ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), marker="o", ms=4, capsize=2,
                        label=f"capacity, {policy} drop")
        if len(dropless) and dropless[metric].notna().any():
            mean, std = dropless[metric].mean(), dropless[metric].std()
            ax.axhline(mean, color="black", ls="--", lw=1, label="dropless")
            if std == std:
                ax.axhspan(mean - std, mean + std, color="black", alpha=0.08, lw=0)
        ax.set_xlabel("capacity factor")
        ax.set_ylabel(label)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


# --- expert specialization (notebooks/03_expert_specialization.ipynb) -----------------------------


def _log2_ratio(p: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """log2(p / baseline), 0 where random routing with the same load would put it; NaN where the
    baseline is 0 or undefined, and clipped where p is 0 (so a never-used cell shows as deep blue)."""
    p, b = p.double(), baseline.double()
    out = torch.log2(p.clamp(min=1e-4) / b)
    return out.masked_fill(~(b > 0), float("nan"))


def plot_ratio_heatmap(p_RC: torch.Tensor, baseline_RC: torch.Tensor, ax=None, title: str = "",
                       row_labels: Sequence[str] | None = None, xlabel: str = "expert", ylabel: str = "",
                       limit: float = 3.0):
    """log2 of an observed share over the share random routing with the same load would give
    (``p_RC`` / ``baseline_RC``, broadcast): red above chance, blue below, white at chance.
    ``limit``: the colour scale spans -limit..+limit (x 1/2^limit .. x 2^limit)."""
    fig, ax = _axes(ax, figsize=(6, 3))
    ratio = _log2_ratio(p_RC, baseline_RC.expand_as(p_RC))
    im = ax.imshow(ratio.numpy(), aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    if row_labels is not None:
        ax.set_yticks(range(len(row_labels)), list(row_labels), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    bar.set_label("log2(observed / random)", fontsize=8)
    return fig


def plot_scores_by_layer(frame: Any, metric: str, names: Sequence[str] | None = None, ax=None, title: str = "",
                         ylabel: str = ""):
    """A metric per MoE layer, one group of bars per layer and one bar per experiment (mean over
    seeds, error bar from the lowest to the highest seed), each with its random-routing baseline
    (``<metric>_baseline``) as a black tick on the bar."""
    fig, ax = _axes(ax, figsize=(7, 3))
    names = list(dict.fromkeys(frame["name"])) if names is None else list(names)
    layers = sorted(frame["layer"].unique())
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        rows = frame[frame["name"] == name].groupby("layer")
        mean, lo, hi = rows[metric].mean(), rows[metric].min(), rows[metric].max()
        base = rows[f"{metric}_baseline"].mean()
        xs = [layers.index(layer) - 0.4 + width * (i + 0.5) for layer in mean.index]
        ax.bar(xs, mean.tolist(), width, label=name)
        # the seed range as its own errorbar: bar(yerr=) warns for a single bar (matplotlib 3.10)
        ax.errorbar(xs, mean.tolist(), yerr=[(mean - lo).tolist(), (hi - mean).tolist()], fmt="none",
                    ecolor="0.35", elinewidth=0.8, capsize=2)
        ax.hlines(base.values, [x - width / 2 for x in xs], [x + width / 2 for x in xs], colors="black", lw=1.5)
    ax.set_xticks(range(len(layers)), [f"layer {layer}" for layer in layers])
    ax.set_ylabel(ylabel or metric)
    ax.set_title(title or f"{metric} (black: random routing with the same load)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    return fig


def plot_paired_seeds(scores: Any, metric: str, names: Sequence[str], ax=None, title: str = "", ylabel: str = ""):
    """One column per experiment, a dot per seed joined by a line to the same seed in the next
    column (the comparison is paired over seeds), and the mean as a black bar."""
    fig, ax = _axes(ax, figsize=(max(4, 1.6 * len(names)), 3))
    table = scores[scores["name"].isin(names)].pivot_table(index="seed", columns="name", values=metric)
    table = table[[n for n in names if n in table.columns]]
    xs = list(range(table.shape[1]))
    for seed, row in table.iterrows():
        ax.plot(xs, row.values, "-o", ms=4, lw=0.8, alpha=0.7, label=f"seed {seed}")
    ax.hlines(table.mean().values, [x - 0.2 for x in xs], [x + 0.2 for x in xs], colors="black", lw=2)
    ax.set_xticks(xs, list(table.columns), rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel or metric)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=6, ncol=2)
    return fig


def plot_saturation(saturation: Any, names: Sequence[str] | None = None, layer: int | None = None, ax=None,
                    title: str = "", mark_step: int | None = None):
    """Router saturation against training step, one line per experiment (mean over seeds and, when
    ``layer`` is None, over MoE layers), its random baseline dashed in the same colour."""
    fig, ax = _axes(ax, figsize=(6, 3))
    names = list(dict.fromkeys(saturation["name"])) if names is None else list(names)
    rows = saturation if layer is None else saturation[saturation["layer"] == layer]
    for name in names:
        by_step = rows[rows["name"] == name].groupby("step")[["saturation", "baseline"]].mean()
        line = ax.plot(by_step.index, by_step["saturation"], "-o", ms=3, label=name)[0]
        ax.plot(by_step.index, by_step["baseline"], "--", color=line.get_color(), lw=0.8)
    if mark_step is not None:
        ax.axvline(mark_step, color="grey", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("top-k overlap with final")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or f"router saturation, {'mean over layers' if layer is None else f'layer {layer}'} "
                 "(dashed: random)", fontsize=10)
    ax.legend(fontsize=7)
    return fig


def plot_class_scores(frame: Any, names: Sequence[str], classes: Sequence[str], layer: int | None = None, ax=None,
                      title: str = ""):
    """Vocabulary specialization per byte class (``vocab/<class>`` columns), one bar per experiment
    (mean over seeds and, when ``layer`` is None, layers), its random baseline as a black tick."""
    rows = frame if layer is None else frame[frame["layer"] == layer]
    long = []
    for c in classes:
        for name in names:
            sel = rows[rows["name"] == name]
            long.append({"name": name, "layer": c, "score": sel[f"vocab/{c}"].mean(),
                         "score_baseline": sel[f"vocab/{c}_baseline"].mean()})
    import pandas as pd

    table = pd.DataFrame(long)
    fig = plot_scores_by_layer(table.assign(layer=table["layer"].map(list(classes).index)), "score", names, ax=ax,
                               title=title or "vocabulary specialization per byte class (black: random)",
                               ylabel="share to the most used expert")
    fig.axes[0].set_xticks(range(len(classes)), list(classes), fontsize=8)
    return fig


def plot_specialization_panel(results: Any, name: str, seed: int, layer: int, domain: str, step: int):
    """One traced run (``workbench.experiments.Results`` with traces) in four views: (a) domain x
    expert at validation ``step`` against the overall load, (b) ``domain``'s expert shares against
    that load, (c) co-activation P(b | a) after training against random routing with the same
    load, (d) router saturation of ``layer`` over training with ``step`` marked."""
    from workbench.analysis.specialization import coactivation, domain_specialization_nmi

    plt = _plt()
    detail = results.detail(name, seed)
    counts = results.routing_counts(name, seed)
    li = counts.index(layer)
    ev = next((e for e in detail["evals"] if e["step"] == step), None)
    if ev is None:
        raise ValueError(f"step={step!r} is invalid: validations of this run are at steps "
                         f"{[e['step'] for e in detail['evals']]}")
    domains = list(ev["domains"])
    if domain not in domains:
        raise ValueError(f"domain={domain!r} is invalid: choose one of {domains}")
    dom = domain_specialization_nmi(torch.tensor(ev["routing_matrix"][li], dtype=torch.long))
    fig, axes = plt.subplots(2, 2, figsize=(11, 6))
    plot_ratio_heatmap(dom.p_expert_given_domain_DE, dom.load_E.unsqueeze(0), ax=axes[0, 0], row_labels=domains,
                       title=f"(a) P(expert | domain) / P(expert), step {step}: NMI {dom.score:.3f} "
                             f"(random {dom.baseline:.4f})")
    d = domains.index(domain)
    E = dom.load_E.numel()
    axes[0, 1].bar(range(E), dom.p_expert_given_domain_DE[d].numpy(), label=f"P(e | {domain})")
    axes[0, 1].step(range(E), dom.load_E.numpy(), where="mid", color="black", lw=1, label="P(e): random, same load")
    axes[0, 1].set_xlabel("expert")
    axes[0, 1].set_title(f"(b) {domain}: share of assignments per expert, step {step}", fontsize=10)
    axes[0, 1].legend(fontsize=7)
    co = coactivation(counts.coactivation_LEE[li], max(counts.tokens, 1))
    plot_ratio_heatmap(co.p_b_given_a_EE, co.baseline_EE, ax=axes[1, 0], xlabel="expert b", ylabel="expert a",
                       title=f"(c) co-activation P(b | a) / random, after training: {co.score:.3f} (random "
                             f"{co.baseline:.3f})")
    sat = results.saturation()
    plot_saturation(sat[(sat["name"] == name) & (sat["seed"] == seed)], [name], layer=layer, ax=axes[1, 1],
                    mark_step=step, title=f"(d) router saturation, layer {layer} (dashed: random)")
    fig.suptitle(f"{name}, seed {seed}, layer {layer}", fontsize=11)
    fig.tight_layout()
    return fig


def specialization_panel(results: Any, names: Sequence[str] | None = None):
    """Dropdowns for run, seed, layer and domain and a slider over the validation steps, drawing
    ``plot_specialization_panel`` below them when one changes (call that once directly for the
    first view, as ``redraw_on_change`` explains)."""
    widgets = _widgets()
    traced = [key for key, d in results.details.items() if d.get("traces")]
    names = list(dict.fromkeys(n for n, _ in traced)) if names is None else list(names)
    first = results.detail(*traced[0])
    counts = results.routing_counts(*traced[0])
    steps = [e["step"] for e in first["evals"]]
    controls = {
        "name": widgets.Dropdown(options=names, value=names[0], description="run"),
        "seed": widgets.Dropdown(options=sorted({s for n, s in traced if n == names[0]}), description="seed"),
        "layer": widgets.Dropdown(options=counts.layers, value=counts.layers[-1], description="layer"),
        "domain": widgets.Dropdown(options=counts.domains, description="domain"),
        "step": widgets.SelectionSlider(options=steps, value=steps[-1], description="checkpoint"),
    }
    return redraw_on_change(lambda **v: plot_specialization_panel(results, **v), controls)
