"""Figures, drawn headless (Agg): each holds the data it was given, not just "a figure"."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from workbench import viz  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _history(steps=6, layers=(0, 2), experts=4):
    rows = []
    for s in range(1, steps + 1):
        row = {"step": s, "lm_loss": 5.0 - 0.5 * s, "max_vio": 0.1 * s}
        for layer in layers:
            row[f"L{layer}/max_vio"] = 0.1 * s + layer
            load = torch.arange(1, experts + 1, dtype=torch.float64) + s + layer
            row[f"L{layer}/load_fraction"] = (load / load.sum()).tolist()
        if s % 3 == 0:
            row["val/code"], row["val/prose"], row["val/loss"] = 4.0 - 0.1 * s, 4.5 - 0.1 * s, 4.2
        rows.append(row)
    return rows


def _bars(ax):
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def _lines(ax, label):
    (line,) = [line for line in ax.get_lines() if line.get_label() == label]
    return line


def test_smooth_is_a_trailing_mean_and_moe_layers_are_read_from_the_keys():
    assert viz.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert viz.smooth([2.0, 4.0], 10) == [2.0, 3.0]
    assert viz.moe_layers_in(_history(layers=(0, 2))) == [0, 2]
    assert viz.moe_layers_in([{"step": 1, "lm_loss": 1.0}]) == [] and viz.moe_layers_in([]) == []


def test_loss_plot_draws_the_history_raw_smoothed_and_per_domain():
    history = _history()
    fig = viz.plot_losses(history, smoothing=3)
    (ax,) = fig.axes
    raw, smoothed = _lines(ax, "train (per step)"), _lines(ax, "train (3-step mean)")
    assert list(raw.get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert list(raw.get_ydata()) == [r["lm_loss"] for r in history]
    assert list(smoothed.get_ydata()) == viz.smooth([r["lm_loss"] for r in history], 3)
    code = _lines(ax, "val/code")  # only the steps that evaluated; val/loss (the mean) is not drawn
    assert list(code.get_xdata()) == [3, 6] and list(code.get_ydata()) == [3.7, 3.4]
    assert {line.get_label() for line in ax.get_lines()} == {"train (per step)", "train (3-step mean)", "val/code",
                                                             "val/prose"}


def test_max_vio_plot_has_one_smoothed_line_per_moe_layer():
    history = _history(layers=(0, 2))
    (ax,) = viz.plot_max_vio(history, smoothing=2).axes
    assert list(_lines(ax, "layer 2").get_ydata()) == viz.smooth([r["L2/max_vio"] for r in history], 2)
    assert list(_lines(ax, "layer 0").get_ydata()) == pytest.approx([0.1, 0.15, 0.25, 0.35, 0.45, 0.55])
    assert [line.get_label() for line in ax.get_lines()] == ["layer 0", "layer 2"]


def test_load_over_time_is_load_over_uniform_per_expert_and_step():
    history = _history(steps=5, experts=4)
    fig = viz.plot_load_over_time(history, layer=2)
    image = [i for i in fig.axes[0].get_images() if isinstance(i, AxesImage)][0]
    expected = torch.tensor([r["L2/load_fraction"] for r in history]).T * 4  # (experts, steps)
    torch.testing.assert_close(torch.as_tensor(image.get_array().data), expected)
    assert len(fig.axes) == 2  # the plot and its colorbar


def test_domain_expert_matrix_rows_are_shares_of_each_domain():
    counts = torch.tensor([[3, 1, 0], [0, 0, 0], [1, 1, 2]])
    fig = viz.plot_domain_expert(counts, ["a", "b", "c"])
    data = torch.as_tensor(fig.axes[0].get_images()[0].get_array().data)
    torch.testing.assert_close(data, torch.tensor([[0.75, 0.25, 0.0], [0.0, 0.0, 0.0], [0.25, 0.25, 0.5]],
                                                  dtype=torch.float64))
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["a", "b", "c"]
    raw = viz.plot_domain_expert(counts, ["a", "b", "c"], normalize=False)
    assert torch.equal(torch.as_tensor(raw.axes[0].get_images()[0].get_array().data), counts.double())


def test_expert_load_bars_are_shares_and_gate_mass_with_the_uniform_line():
    fig = viz.plot_expert_load([10, 30, 0, 60], gate_mass=[0.2, 0.3, 0.0, 0.5])
    (ax,) = fig.axes
    bars = _bars(ax)
    assert [b.get_height() for b in bars[:4]] == pytest.approx([0.1, 0.3, 0.0, 0.6])
    assert [b.get_height() for b in bars[4:]] == pytest.approx([0.2, 0.3, 0.0, 0.5])
    (uniform,) = ax.get_lines()
    assert list(uniform.get_ydata()) == [0.25, 0.25]
    assert len(_bars(viz.plot_expert_load([1, 1]).axes[0])) == 2


def test_token_routing_grid_puts_each_weight_at_its_token_and_expert():
    ids = torch.tensor([[0, 2], [1, 2], [3, 0]])
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.9, 0.1]])
    fig = viz.plot_token_routing(["a", "b", "c"], ids, weights, num_experts=4)
    grid = torch.as_tensor(fig.axes[0].get_images()[0].get_array().data)  # (experts, tokens)
    expected = torch.zeros(4, 3)
    for t in range(3):
        for k in range(2):
            expected[ids[t, k], t] = weights[t, k]
    torch.testing.assert_close(grid, expected)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["a", "b", "c"]


def test_gate_histogram_is_a_density_per_series():
    gates = {"init": torch.full((100,), 0.5), "trained": torch.tensor([0.1, 0.9, 0.9, 0.9])}
    (ax,) = viz.plot_gate_histogram(gates, bins=10).axes
    assert len(ax.patches) == 2 and [t.get_text() for t in ax.get_legend().get_texts()] == ["init", "trained"]
    for patch in ax.patches:  # each outline encloses area 1
        xy = patch.get_xy()
        area = sum((xy[i + 1, 0] - xy[i, 0]) * xy[i, 1] for i in range(len(xy) - 1) if xy[i, 1] == xy[i + 1, 1])
        assert area == pytest.approx(1.0)


def test_metric_bars_have_one_bar_per_name_and_series_at_the_given_heights():
    series = {"init": [1.0, 2.0, 3.0], "trained": [0.5, 0.25, 0.0]}
    (ax,) = viz.plot_metric_bars(["a", "b", "c"], series, ylim=(0.0, 4.0), title="t").axes
    assert [b.get_height() for b in _bars(ax)] == [1.0, 2.0, 3.0, 0.5, 0.25, 0.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    assert ax.get_ylim() == (0.0, 4.0) and ax.get_title() == "t"


def _panel(num_experts=4):
    return {"token_strings": ["x", "y"], "expert_ids_TK": torch.tensor([[0, 1], [2, 3]]),
            "weights_TK": torch.tensor([[0.5, 0.5], [0.8, 0.2]]), "num_experts": num_experts,
            "tokens_per_expert": [2.0, 1.0, 1.0, 0.0], "gate_mass": [0.4, 0.2, 0.3, 0.1], "gates": [0.5, 0.5, 0.8, 0.2],
            "capacity": 1, "dropped_fraction": 0.25, "max_vio": 1.0}


def test_router_panel_shows_routing_load_with_capacity_and_gates():
    fig = viz.plot_router_panel(**_panel(), title="softmax_topk")
    left, middle, right = fig.axes[0], fig.axes[1], fig.axes[2]
    assert left.get_title() == "softmax_topk: combine weight per token"
    assert middle.get_title() == "MaxVio 1.00, dropped 25.0%"
    assert [b.get_height() for b in _bars(middle)][:4] == [0.5, 0.25, 0.25, 0.0]
    heights = sorted({tuple(line.get_ydata()) for line in middle.get_lines()})
    assert heights == [(0.25, 0.25)]  # uniform share 1/4 and capacity 1/4 of 4 assignments coincide here
    assert right.get_title() == "gate weights"


def test_router_rows_draw_three_panels_per_row():
    fig = viz.plot_router_rows({"init": _panel(), "after 5 steps": _panel()}, title="both")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles.count("init: combine weight per token") == 1
    assert titles.count("after 5 steps: combine weight per token") == 1
    assert titles.count("gate weights") == 2 and fig._suptitle.get_text() == "both"


def test_router_panel_data_is_the_chosen_sequence_of_a_measured_batch():
    from tests.analysis.helpers import MICRO
    from workbench.analysis import analyze_router
    from workbench.data import ByteTokenizer

    tokens = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(0))
    result = analyze_router("expert_choice", tokens, num_experts=4, top_k=2, base=MICRO)
    data = viz.router_panel_data(result, layer=1, sequence=2, length=10)
    info = result.layer_info(1)
    rows = slice(2 * 32, 2 * 32 + 10)
    assert data["token_strings"] == ByteTokenizer().token_strings(tokens[2, :10])
    assert torch.equal(data["expert_ids_TK"], info.router_output.expert_ids_TK[rows])
    mask = info.router_output.mask_TK[rows]
    assert (data["weights_TK"][~mask] == 0).all()  # padding slots draw nothing
    assert torch.equal(data["weights_TK"][mask], info.router_output.weights_TK[rows][mask].float())
    assert data["tokens_per_expert"] == result.layer_metrics(1)["tokens_per_expert"]
    with pytest.raises(ValueError, match="sequence=3"):
        viz.router_panel_data(result, layer=1, sequence=3)


def test_training_report_lays_out_losses_max_vio_load_and_domain_matrices(tmp_path):
    history = _history(layers=(0, 2))
    ev = SimpleNamespace(routing_matrix=torch.tensor([[[3, 1, 0, 0], [0, 1, 1, 2]], [[1, 1, 1, 1], [4, 0, 0, 0]]]),
                         domains=["code", "prose"], step=6)
    path = tmp_path / "report.png"
    fig = viz.training_report(history, ev, path=path)
    assert path.stat().st_size > 10_000
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:2] == ["loss", "load imbalance (10-step mean)"]
    assert "layer 0: load / uniform" in titles and "layer 2: load / uniform" in titles
    matrix_axes = [ax for ax in fig.axes if ax.get_title() == "layer 2: domain x expert (step 6)"]
    data = torch.as_tensor(matrix_axes[0].get_images()[0].get_array().data)
    torch.testing.assert_close(data[1], torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    # dense history: the loss plot alone
    dense = viz.training_report([{"step": 1, "lm_loss": 3.0}, {"step": 2, "lm_loss": 2.0}], None)
    assert [ax.get_title() for ax in dense.axes] == ["loss"]


def test_pickers_draw_nothing_when_built_and_draw_each_change():
    pytest.importorskip("ipywidgets")
    calls = []
    panel = viz.layer_picker(lambda layer: calls.append(layer), [0, 2, 3])
    dropdown = panel.children[0].children[0]
    assert calls == [] and dropdown.value == 0
    dropdown.value = 3
    dropdown.value = 2
    assert calls == [3, 2]

    shown = []
    panel = viz.router_picker(lambda router, num_experts, top_k: shown.append((router, num_experts, top_k)),
                              ["a", "b"], [4, 8], [1, 2], value=("b", 8, 2))
    router, experts, top_k = panel.children[0].children
    assert shown == [] and (router.value, experts.value, top_k.value) == ("b", 8, 2)
    experts.value = 4
    router.value = "a"
    assert shown == [("b", 4, 2), ("a", 4, 2)]


# --- the specialization lab's figures --------------------------------------------------------------


def test_ratio_heatmap_is_log2_of_observed_over_random():
    p = torch.tensor([[0.5, 0.25, 0.25, 0.0]])
    base = torch.tensor([[0.25, 0.25, 0.25, 0.25]])
    fig = viz.plot_ratio_heatmap(p, base, row_labels=["d"])
    image = next(a for a in fig.axes[0].get_children() if isinstance(a, AxesImage)).get_array()
    assert image[0, :3].tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert image[0, 3] < -3  # an unused cell is clipped far below chance


def _frame():
    import pandas as pd

    rows = []
    for name, shift in (("A", 0.0), ("B", 0.1)):
        for seed in (0, 1):
            for layer in (0, 1):
                rows.append({"name": name, "seed": seed, "layer": layer, "domain_nmi": 0.2 + shift + 0.01 * seed,
                             "domain_nmi_baseline": 0.01, "vocab/letters": 0.5 + shift, "vocab/letters_baseline": 0.3})
    return pd.DataFrame(rows)


def test_scores_by_layer_draw_the_seed_mean_per_layer_and_the_baseline_ticks():
    fig = viz.plot_scores_by_layer(_frame(), "domain_nmi")
    bars = [p for p in fig.axes[0].patches if isinstance(p, Rectangle)]
    assert sorted(round(b.get_height(), 4) for b in bars) == [0.205, 0.205, 0.305, 0.305]
    ticks = fig.axes[0].collections
    assert any(c.get_segments() and c.get_segments()[0][0][1] == pytest.approx(0.01) for c in ticks)


def test_paired_seeds_join_each_seed_across_runs():
    frame = _frame().groupby(["name", "seed"])[["domain_nmi"]].mean().reset_index()
    fig = viz.plot_paired_seeds(frame, "domain_nmi", ["A", "B"])
    lines = [line for line in fig.axes[0].lines if line.get_label().startswith("seed")]
    assert [line.get_ydata().tolist() for line in lines] == [pytest.approx([0.2, 0.3]), pytest.approx([0.21, 0.31])]


def test_class_scores_have_one_bar_per_run_and_class():
    fig = viz.plot_class_scores(_frame(), ["A", "B"], ["letters"])
    heights = sorted(round(p.get_height(), 4) for p in fig.axes[0].patches if isinstance(p, Rectangle))
    assert heights == [0.5, 0.6]


def test_specialization_panel_draws_a_traced_run(tmp_path):
    from workbench.experiments import Experiment, run_experiments
    from workbench.train.config import TrainConfig

    model = viz_tiny_model()
    train = TrainConfig(steps=2, batch_size=2, eval_every=1, eval_windows=1, max_bytes_per_domain=200_000,
                        progress=False)
    results = run_experiments([Experiment(name="r", model=model, train=train)], seeds=[0], cache_dir=tmp_path,
                              log=None, traces=True)
    fig = viz.plot_specialization_panel(results, "r", 0, 1, "code", 1)
    assert len(fig.axes) >= 4
    sat = fig.axes[-1] if fig.axes[-1].lines else fig.axes[3]
    assert any(line.get_xdata().tolist() == [1, 2] for line in sat.lines)  # saturation at both validations
    with pytest.raises(ValueError, match="step"):
        viz.plot_specialization_panel(results, "r", 0, 1, "code", 7)
    with pytest.raises(ValueError, match="domain"):
        viz.plot_specialization_panel(results, "r", 0, 1, "poetry", 1)
    pytest.importorskip("ipywidgets")
    panel = viz.specialization_panel(results)
    assert [c.description for c in panel.children[0].children] == ["run", "seed", "layer", "domain", "checkpoint"]


def viz_tiny_model():
    from workbench.config import preset

    return preset("tiny", expert_hidden=16).replace(seq_len=32, d_model=32, n_layers=2, n_heads=2, dense_hidden=32)
