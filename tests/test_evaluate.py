"""The evaluation command end to end on a tiny Flux, and the judge plumbing with a stand-in judge."""

from __future__ import annotations

import json

import torch
from massact_nn.tracing.generation import GenerationConfig
from massact_nn.tracing.probes.common import judge_readings, judge_scores
from massact_nn.tracing.probes.evaluate import EvaluationConfig, evaluate, save_evaluation, transport_pairs
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
    assert readings[1]["shape"] == W.SHAPES[int(pred["shape"][1])]
    caps = [W.caption_for(int(pred["fg_colour"][i]), int(pred["shape"][i]), int(pred["bg_colour"][i]))
            for i in range(3)]
    assert judge_scores(net, imgs, caps)["fg_colour"] == 1.0  # the judge agrees with its own reading
    assert judge_scores(net, imgs, ["not a world caption"] * 3) is None
    # Result == source: every source attribute "moved"; target == source: "already" is 1 too.
    m = transport_metrics(imgs, imgs, imgs, torch.ones(3, 4, 4, dtype=torch.bool), net)
    assert m["moved"] == {"fg_colour": 1.0, "shape": 1.0} and m["kept"]["bg_colour"] == 1.0
    assert m["to_source"]["all"] == 0.0 and m["to_target"]["outside"] is None  # p covers everything


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
