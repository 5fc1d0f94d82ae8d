"""Tokenizers built in-process from a word list (no Hub access)."""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "on", "in", "with", "and", "photo", "cat", "dog", "red", "green",
    "blue", "yellow", "white", "black", "circle", "square", "triangle", "cross", "small",
    "large", "background", "left", "right", "car", "tree", "house", "sky", "sea", "painting",
)


def clip_tokenizer(words: tuple[str, ...] = DEFAULT_WORDS, max_length: int = 77):
    """A word-level ``CLIPTokenizer`` (empty merges, so every known word is one token)."""
    import tempfile

    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for w in words:
        vocab.setdefault(w + "</w>", len(vocab))
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    with tempfile.TemporaryDirectory() as d:
        vf, mf = Path(d) / "vocab.json", Path(d) / "merges.txt"
        vf.write_text(json.dumps(vocab))
        mf.write_text("#version: 0.2\n")
        tok = CLIPTokenizer(str(vf), str(mf), model_max_length=max_length, pad_token="!")
    return tok


def t5_tokenizer(words: tuple[str, ...] = DEFAULT_WORDS, max_length: int = 32):
    """A ``T5Tokenizer`` whose unigram vocabulary is the word list (plus pad/eos/unk)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -float(i + 1)) for i, w in enumerate(words)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


#: A ChatML template like Qwen's, minus tools; ``enable_thinking`` is accepted and ignored.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


#: ChatML over Mistral-style messages whose ``content`` is a list of ``{"type": "text", ...}`` parts.
CONTENT_LIST_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer(max_length: int = 512, chat_template: str = CHATML_TEMPLATE):
    """A byte-level ``Qwen2Tokenizer`` with no merges (one token per UTF-8 byte) and ChatML.

    Enough for the Qwen/Gemma-conditioned pipelines, which only need ``apply_chat_template``,
    padding and truncation to work.

    Ids: bytes 0-255, then ``<|endoftext|>`` (pad/eos) 256, ``<|im_start|>`` 257, ``<|im_end|>`` 258.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=[], extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=max_length,
    )
    tok.chat_template = chat_template
    return tok


def bert_tokenizer(words: tuple[str, ...] = DEFAULT_WORDS, max_length: int = 77):
    """A word-level ``BertTokenizer`` (the special tokens, the word list and single letters)."""
    from transformers import BertTokenizer

    vocab: dict[str, int] = {}
    for w in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *"abcdefghijklmnopqrstuvwxyz"):
        vocab.setdefault(w, len(vocab))
    return BertTokenizer(vocab=vocab, model_max_length=max_length)
