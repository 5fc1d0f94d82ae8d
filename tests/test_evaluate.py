"""The evaluation command end to end on a tiny Flux, and the judge plumbing with a stand-in judge."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from massact_nn.tracing.generation import GenerationConfig
from massact_nn.tracing.probes.common import judge_readings, judge_scores
from massact_nn.tracing.probes.disruption import DisruptionConfig, disrupt
from massact_nn.tracing.probes.evaluate import (
    EvaluationConfig,
    evaluate,
    save_evaluation,
    to_markdown,
    transport_pairs,
    world_captions,
)
from massact_nn.tracing.probes.transport import TransportConfig, transport
from massact_nn.tracing.probes.transport_parts import transport_metrics
from massact_nn.tracing.stats import StatsConfig, collect_stats

from massact_nn import world as W


def test_transport_pairs_differ_in_every_attribute():
    src, tgt = transport_pairs(20, 3)
    for s, t in zip(src, tgt):
        a, b = W.parse_caption(s), W.parse_caption(t)
        assert all(a[k] != b[k] for k in a) and a["fg_colour"] != b["bg_colour"]


def test_judge_metrics_with_a_stand_in_judge():
    from massact_nn.tracing.toy.judge import JudgeNet, judge

    torch.manual_seed(0)
    net = JudgeNet(width=4).eval()
    imgs = torch.rand(3, 3, 32, 32)
    readings = judge_readings(net, imgs)
    pred = judge(imgs * 2 - 1, net)
    for i in range(3):  # every image's reading, in order
        assert readings[i] == {"fg_colour": W.COLOURS[int(pred["fg_colour"][i])],
                               "shape": W.SHAPES[int(pred["shape"][i])],
                               "bg_colour": W.BG_COLOURS[int(pred["bg_colour"][i])]}
    caps = [W.caption_for(int(pred["fg_colour"][i]), int(pred["shape"][i]), int(pred["bg_colour"][i]))
            for i in range(3)]
    assert judge_scores(net, imgs, caps)["fg_colour"] == 1.0  # the judge agrees with its own reading
    assert judge_scores(net, imgs, ["not a world caption"] * 3) is None
    # Result == source: every source attribute "moved"; target == source: "already" is 1 too.
    m = transport_metrics(imgs, imgs, imgs, torch.ones(3, 4, 4, dtype=torch.bool), net)
    assert m["moved"] == {"fg_colour": 1.0, "shape": 1.0} and m["kept"]["bg_colour"] == 1.0
    assert m["to_source"]["all"] == 0.0 and m["to_target"]["outside"] is None  # p covers everything


def _render(captions: list[str]) -> torch.Tensor:
    """Clean world images for captions, in [0, 1]."""
    attrs = [W.parse_caption(c) for c in captions]
    images, _ = W.render({k: np.array([a[k] for a in attrs]) for k in attrs[0]})
    return (torch.from_numpy(images) + 1) / 2


def test_moved_and_kept_read_the_source_and_the_target_with_the_shipped_judge():
    from massact_nn.tracing.toy.export import shipped_path
    from massact_nn.tracing.toy.judge import load_judge

    net = load_judge(shipped_path())
    src_caps, tgt_caps = transport_pairs(6, 0)  # pairs that differ in every attribute
    src, tgt = _render(src_caps), _render(tgt_caps)
    both = [W.caption_for(a["fg_colour"], a["shape"], b["bg_colour"])  # the ideal transport
            for a, b in ((W.parse_caption(s), W.parse_caption(t)) for s, t in zip(src_caps, tgt_caps))]
    p = torch.ones(6, 4, 4, dtype=torch.bool)
    as_source = transport_metrics(src, tgt, src, p, net)
    assert as_source["moved"] == {"fg_colour": 1.0, "shape": 1.0} and as_source["kept"] == {"bg_colour": 0.0}
    # The untouched target shares nothing with the source: the baseline to beat is 0.
    assert as_source["already"] == {"fg_colour": 0.0, "shape": 0.0, "bg_colour": 0.0}
    as_target = transport_metrics(src, tgt, tgt, p, net)
    assert as_target["moved"] == {"fg_colour": 0.0, "shape": 0.0} and as_target["kept"] == {"bg_colour": 1.0}
    ideal = transport_metrics(src, tgt, _render(both), p, net)
    assert ideal["moved"] == {"fg_colour": 1.0, "shape": 1.0} and ideal["kept"] == {"bg_colour": 1.0}
    no_control = transport_metrics(src, None, src, p, net)
    assert no_control["moved"] == as_source["moved"] and "kept" not in no_control


def test_evaluate_writes_tables(tiny_flux, tmp_path):
    st = collect_stats(tiny_flux, ["a red cat", "a dog"],
                       StatsConfig(GenerationConfig(steps=2, height=32, width=32), k=2, progress=False))
    cfg = EvaluationConfig(ks=[1], prompts=2, pairs=2, random_draws=1, num_steps=2, height=32, width=32,
                           transport_ks=[4], transport_masks=("all",), segmentation=None)
    report = evaluate(tiny_flux, st, cfg)
    md = save_evaluation(report, tmp_path)
    back = json.loads((tmp_path / "evaluation.json").read_text())
    assert back["disruption"]["summary"][1]["control"] == "top" and back["disruption"]["summary"][1]["k"] == 1
    assert [r["channels"] for r in back["transport"]["rows"]] == ["top-4", "low-4", "random-4", "all"]
    assert "| top | 1 | 1 |" in md and "| all (1) | top-4 |" in md
    assert (tmp_path / "evaluation.md").read_text() == md
    assert set(back["versions"]) >= {"torch", "diffusers", "nnsight"} and back["stats"] is None
    # Each row is what the probe itself gives for those channels, sources and targets.
    gen = GenerationConfig(steps=2, seed=cfg.seed, height=32, width=32)
    src, tgt = transport_pairs(cfg.pairs, cfg.seed)
    order = {s.module: st.stat(s.module, "abs_mean").argsort(descending=True) for s in st.sites}
    direct = {"top-4": {m: o[:4] for m, o in order.items()}, "low-4": {m: o[-4:] for m, o in order.items()},
              "all": {s.module: torch.arange(s.channels) for s in st.sites}}
    rows = {r["channels"]: r for r in back["transport"]["rows"]}
    for name, chans in direct.items():
        want = transport(tiny_flux, src, tgt, st,
                         TransportConfig(generation=gen, channels=chans, progress=False)).metrics
        assert rows[name]["mse_to_source"] == pytest.approx(want["to_source"]["all"], rel=1e-5), name
        assert rows[name]["mse_to_target"] == pytest.approx(want["to_target"]["all"], rel=1e-5), name
    assert len({r["mse_to_target"] for r in rows.values()}) == 4, "the channel sets must change the result"
    # The disruption rows are the probe's own summary on the evaluation's prompts.
    d = disrupt(tiny_flux, world_captions(cfg.prompts, cfg.seed), st,
                DisruptionConfig(generation=gen, k=[1], random_draws=1, progress=False))
    for got, want in zip(back["disruption"]["summary"], d.metrics["summary"], strict=True):
        assert (got["control"], got["k"]) == (want["control"], want["k"])
        assert got["mse"] == pytest.approx(want["mse"], rel=1e-5, abs=1e-12)


def test_transport_random_controls_average_their_draws(tiny_flux, monkeypatch):
    import massact_nn.tracing.probes.evaluate as E
    from massact_nn.tracing.probes.common import channel_sets

    st = collect_stats(tiny_flux, ["a red cat"], StatsConfig(GenerationConfig(steps=1, height=32, width=32),
                                                             k=2, progress=False))
    first = st.sites[0].module

    class Ran:  # what the fake transport reports: a number that names the channels it was given
        def __init__(self, chans):
            v = float(sum(int(c) * 10 ** i for i, c in enumerate(chans[first])))
            self.token_mask = None
            self.metrics = {"token_fraction": 1.0, "to_source": {"all": v}, "to_target": {"all": -v,
                            "outside": None}, "moved": {"shape": v}, "kept": None, "already": None}

    class Disrupted:
        metrics = {"summary": []}
        meta = {"judge": False}

    monkeypatch.setattr(E, "transport", lambda model, src, tgt, st, cfg: Ran(cfg.channels))
    monkeypatch.setattr(E, "disrupt", lambda *a, **k: Disrupted())
    cfg = EvaluationConfig(pairs=1, random_draws=3, num_steps=1, height=32, width=32, transport_ks=[2],
                           transport_masks=("all",), segmentation=None, seed=5)
    rows = {r["channels"]: r for r in evaluate(tiny_flux, st, cfg)["transport"]["rows"]}
    assert {name: r["draws"] for name, r in rows.items()} == {"top-2": 1, "low-2": 1, "random-2": 3, "all": 1}
    draws = [Ran(channel_sets(st, st.sites, "random", 2, seed=5 + d)).metrics for d in range(3)]
    assert len({m["to_source"]["all"] for m in draws}) > 1, "the draws must differ"
    mean = sum(m["to_source"]["all"] for m in draws) / 3
    got = rows["random-2"]
    assert got["mse_to_source"] == pytest.approx(mean) and got["mse_to_target"] == pytest.approx(-mean)
    assert got["moved"] == {"shape": pytest.approx(mean)}
    assert got["mse_to_target_outside"] is None and got["kept"] is None
    assert "| all (1) | random-2 | 3 |" in to_markdown(evaluate(tiny_flux, st, cfg))
