"""Report text: every number in a sentence comes from the rows it was given."""

from __future__ import annotations

import pytest
import torch

from workbench.analysis import BatchRouting, RouterRun, describe_routers, router_takeaways, summary_rows
from workbench.analysis import report as report_module


def _batch(router, metrics_per_layer, top_k=2):
    return BatchRouting(router, 4, top_k, list(range(len(metrics_per_layer))), [], metrics_per_layer,
                        torch.zeros(1, 4, dtype=torch.long), True)


def _metrics(max_vio, cv=0.1, entropy=0.9, unused=0, dropped=0.0, confidence=0.5, mean_gate=0.5, per_token=2.0):
    return {"max_vio": max_vio, "cv": cv, "entropy": entropy, "unused_experts": unused, "dropped_fraction": dropped,
            "router_confidence": confidence, "mean_gate": mean_gate, "experts_per_token": per_token}


def test_summary_rows_average_the_layers_of_each_state():
    init = _batch("a", [_metrics(1.0, dropped=0.2), _metrics(3.0, dropped=0.4)])
    trained = _batch("a", [_metrics(0.5, cv=0.2, unused=1, confidence=0.7), _metrics(1.5, cv=0.4, unused=2,
                                                                                   confidence=0.9)], top_k=1)
    run = RouterRun("a", init, trained, steps=5, val_loss=2.5, tokens_per_s=1234.0, history=[],
                    leak={"train": 0.5, "eval": 0.0, "eval_capacity": 0.25})
    (row,) = summary_rows({"a": run})
    assert row["router"] == "a" and row["top_k"] == 1
    assert row["max_vio_init"] == 2.0 and row["max_vio_trained"] == 1.0
    assert row["dropped_init"] == pytest.approx(0.3) and row["dropped_trained"] == 0.0
    assert row["cv_trained"] == pytest.approx(0.3) and row["confidence"] == pytest.approx(0.8)
    assert row["unused_init"] == 0 and row["unused_trained"] == 3
    assert row["causal_eval"] and not row["causal_train"]
    assert row["leak_eval_capacity"] == 0.25 and row["val_loss"] == 2.5 and row["tokens_per_s"] == 1234.0
    # the tolerance decides causality, and a sequence of runs gives the same rows as a mapping
    assert summary_rows([run], tolerance=1.0)[0]["causal_train"]
    assert summary_rows([run]) == [row]


def _row(router, max_vio, dropped, val_loss, causal_eval=True, causal_train=True, tokens_per_s=1000.0, unused=0,
         leak_capacity=0.0):
    return {"router": router, "max_vio_init": 1.0, "max_vio_trained": max_vio, "dropped_trained": dropped,
            "unused_trained": unused, "val_loss": val_loss, "causal_eval": causal_eval, "causal_train": causal_train,
            "tokens_per_s": tokens_per_s, "leak_eval_capacity": leak_capacity}


def test_takeaways_report_the_extremes_of_the_rows():
    rows = [_row("a", 0.5, 0.1, 3.0, tokens_per_s=500.0),
            _row("b", 0.1, 0.0, 2.5, causal_eval=False, causal_train=False, unused=2),
            _row("c", 2.0, 0.3, 2.8, causal_train=False, tokens_per_s=900.0, leak_capacity=0.5)]
    assert router_takeaways(rows) == [
        "lowest MaxVio after training: b (0.100); highest: c (2.000)",
        "MaxVio fell from initialisation to the end of training for 2 of 3 routers: a, b",
        "most assignments dropped after training: c (30.0%); routers that dropped nothing on the batch: b",
        "experts left without any assignment after training: b (2)",
        # b has the lowest loss but is not causal at evaluation: c wins among the comparable ones
        "lowest validation loss among the routers that are causal at evaluation (the router alone, dropless): "
        "c (2.800 nats/byte); not comparable (not causal at evaluation): b",
        "causal at evaluation but not in training (the training loss reads later tokens): c",
        "causal routers whose earlier logits still moved with later tokens through the capacity dispatch's drops: "
        "1 of 2 (largest change c, 0.5): c",
        "highest training throughput: b (1,000 tokens/s); lowest: a (500 tokens/s)",
    ]


def test_takeaways_name_every_router_of_a_tie_and_skip_what_did_not_happen():
    rows = [_row("a", 0.0, 0.0, 3.0), _row("b", 0.7, 0.2, 2.9), _row("c", 0.0, 0.0, 3.1)]
    lines = router_takeaways(rows)
    assert lines[0] == "lowest MaxVio after training: a, c (0.000); highest: b (0.700)"
    assert "experts left without any assignment after training: none" in lines
    assert not [line for line in lines if "not in training" in line or "capacity dispatch's drops" in line]
    assert lines[-1] == "highest training throughput: a, b, c (1,000 tokens/s); lowest: a, b, c (1,000 tokens/s)"
    assert router_takeaways([]) == []


def test_describe_routers_gives_the_first_paragraph_of_each_docstring(monkeypatch):
    class Fancy:
        """Routes each token by
        a fancy rule.

        Details that the table leaves out.
        """

    class Plain:
        pass

    monkeypatch.setattr(report_module, "ROUTERS", {"fancy": Fancy, "plain": Plain})
    assert describe_routers() == [
        {"router": "fancy", "class": "Fancy", "what it does": "Routes each token by a fancy rule."},
        {"router": "plain", "class": "Plain", "what it does": ""},
    ]
