"""Tiny random GPT-2, Llama and BERT models with word-level tokenizers, built in-process.

For tests and for trying the LLM commands without any download. A GPT-2 can carry a planted
massive channel (a large bias on one channel of an early MLP output, which the residual stream
carries to every later layer), the ground truth the statistics must find.
"""

from __future__ import annotations

from typing import Any

import torch

from massact_nn.errors import MassactError, choice_error

from ..testing.tokenizers import DEFAULT_WORDS

TINY: tuple[str, ...] = ("gpt2-tiny", "llama-tiny", "bert-tiny")
WIDTH = 32
LAYERS = 4


def word_tokenizer(kind: str, words: tuple[str, ...] = DEFAULT_WORDS) -> Any:
    """A word-level fast tokenizer (whitespace/punctuation split, unknown words → unk).

    ``bert`` wraps each text as ``[CLS] ... [SEP]``, ``llama`` prepends ``<s>``, ``gpt2`` adds
    nothing, as their real tokenizers do.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = {
        "bert": {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"},
        "gpt2": {"pad_token": "<|pad|>", "unk_token": "<|unk|>", "eos_token": "<|endoftext|>"},
        "llama": {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
    }[kind]
    vocab: dict[str, int] = {}
    for t in [*specials.values(), *words, *".,!?"]:
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    if kind == "bert":
        cls, sep = vocab["[CLS]"], vocab["[SEP]"]
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
    elif kind == "llama":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=64, **specials)


def tiny_model(
    name: str, seed: int = 0, plant: tuple[int, float] | None = None, plant_layer: int = 0
) -> tuple[torch.nn.Module, Any]:
    """A tiny random model and its tokenizer.

    Args:
        name: One of :data:`TINY`.
        seed: Initialisation seed.
        plant: ``(channel, value)``: set that channel of layer ``plant_layer``'s MLP output bias
            (GPT-2 only: Llama's MLPs have no bias).
        plant_layer: Layer whose MLP carries the planted bias.

    Returns:
        ``(model, tokenizer)``; GPT-2 and Llama as causal LMs (``transformer.h`` /
        ``model.layers``), BERT as a base ``BertModel`` (``encoder.layer``).
    """
    from transformers import (
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    if name not in TINY:
        raise choice_error("tiny model", name, TINY)
    kind = name.split("-")[0]
    tok = word_tokenizer(kind)
    ids = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id}
    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = GPT2Config(n_embd=WIDTH, n_layer=LAYERS, n_head=2, n_positions=64,
                         bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, **ids)
        model = GPT2LMHeadModel(cfg)
    elif kind == "llama":
        cfg = LlamaConfig(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=LAYERS,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **ids)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = BertConfig(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=LAYERS,
                         num_attention_heads=2, max_position_embeddings=64, **ids)
        model = BertModel(cfg, add_pooling_layer=False)
    if plant is not None:
        if kind != "gpt2":
            raise MassactError(f"plant is supported for gpt2-tiny only, not {name!r}")
        channel, value = plant
        if not 0 <= channel < WIDTH or not 0 <= plant_layer < LAYERS:
            raise MassactError(
                f"plant channel {channel} / layer {plant_layer} is out of range; "
                f"accepted: 0..{WIDTH - 1} / 0..{LAYERS - 1}"
            )
        with torch.no_grad():
            model.transformer.h[plant_layer].mlp.c_proj.bias[channel] = value
    return model.eval(), tok
