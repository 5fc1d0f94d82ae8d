"""Where a transformers language/encoder model keeps its layers: one family per module structure.

A family is data: the path of its ``nn.ModuleList`` of layers relative to the base model (``h`` for
GPT-2, ``layers`` for Llama/Mistral/Qwen, ``encoder.layer`` for BERT), found either on the module
itself (``GPT2Model``, ``BertModel``: sentence-transformers' MiniLM is one) or under one wrapper
attribute (``transformer.h`` of ``GPT2LMHeadModel``, ``model.layers`` of ``LlamaForCausalLM``,
``bert.encoder.layer`` of ``BertForMaskedLM``).

Layer outputs (transformers 5.24, read from the source): ``GPT2Block``, ``LlamaDecoderLayer``
(and the Mistral/Qwen2/Qwen3 copies) and ``BertLayer`` return the residual stream as ONE tensor.
transformers 4.x returned a tuple whose element 0 is that tensor; :func:`read_hidden` accepts
both and fails loudly on anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from massact_nn.errors import MassactError
from massact_nn.sites import Site


@dataclass(frozen=True)
class LLMFamily:
    """One family of transformers models, by module structure.

    Attributes:
        name: Family name (``"gpt2"``, ``"llama"``, ``"bert"``).
        layers: Path of the layer ``ModuleList`` relative to the base model.
        kind: ``"decoder"`` or ``"encoder"`` (the site kind in tables).
        examples: Model classes this was checked on.
        notes: What was verified, caveats.
    """

    name: str
    layers: str
    kind: str
    examples: tuple[str, ...] = ()
    notes: str = ""


FAMILIES: tuple[LLMFamily, ...] = (
    LLMFamily(
        "bert", "encoder.layer", "encoder",
        ("BertModel", "BertForMaskedLM", "RobertaModel"),
        "BertLayer returns the tensor; sentence-transformers' all-MiniLM-L6-v2 is a BertModel.",
    ),
    LLMFamily(
        "gpt2", "h", "decoder", ("GPT2Model", "GPT2LMHeadModel"),
        "GPT2Block returns the tensor (transformers 5); no final norm inside the residual stream.",
    ),
    LLMFamily(
        "llama", "layers", "decoder",
        ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
        "LlamaDecoderLayer returns the tensor; covers the Llama/Mistral/Qwen layer layout.",
    ),
)


def supported_families() -> str:
    """One line naming every family and its layer path (for error messages)."""
    return ", ".join(f"{f.name} ([prefix.]{f.layers})" for f in FAMILIES)


def _get(module: Any, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _unwrap(model: Any) -> torch.nn.Module:
    # nnsight envoys keep the wrapped module in ``_module``.
    m = getattr(model, "_module", model)
    if not isinstance(m, torch.nn.Module):
        raise MassactError(
            f"expected a torch module or an nnsight model over one, got {type(model).__name__}"
        )
    return m


def family_of(model: Any) -> tuple[LLMFamily, str]:
    """The family of a transformers model and the full path of its layer list.

    The layer list is looked up on the model itself first, then under its base model (the
    ``base_model_prefix`` attribute of ``*ForCausalLM`` / ``*LMHeadModel`` / ``*ForMaskedLM``
    wrappers). Encoder-decoder models are refused.

    Raises:
        MassactError: naming the model class and listing the supported families.
    """
    m = _unwrap(model)
    cfg = getattr(m, "config", None)
    if getattr(cfg, "is_encoder_decoder", False):
        # Their layers sit in an encoder and a decoder; measuring one of them would pass silently
        # for the whole model.
        raise MassactError(
            f"unsupported model {type(m).__name__!r}: an encoder-decoder; "
            f"supported families: {supported_families()}"
        )
    # The model itself, or the base model inside a task wrapper (``model.`` of LlamaForCausalLM,
    # ``transformer.`` of GPT2LMHeadModel, ``bert.`` of BertForMaskedLM): transformers names it
    # ``base_model_prefix``. Any other child (BART's ``encoder``) is not a supported layout.
    prefixes = [""]
    base = getattr(m, "base_model_prefix", None)
    if isinstance(base, str) and base and isinstance(getattr(m, base, None), torch.nn.Module):
        prefixes.append(f"{base}.")
    for fam in FAMILIES:
        for prefix in prefixes:
            layers = _get(m, prefix + fam.layers)
            if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
                return fam, prefix + fam.layers
    raise MassactError(
        f"unsupported model structure {type(m).__name__!r} (no layer list found); "
        f"supported families: {supported_families()}"
    )


def width_of(model: Any) -> int:
    """Residual-stream width from the model's config (works on a meta-device model)."""
    cfg = getattr(_unwrap(model), "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        w = getattr(cfg, key, None)
        if isinstance(w, int) and w > 0:
            return w
    raise MassactError(f"cannot read the hidden size of {type(_unwrap(model)).__name__} from its config")


def llm_sites(model: Any) -> list[Site]:
    """Sites of a transformers model: every layer's residual-stream output, in order.

    Sites are named by module path relative to the wrapped model (``encoder.layer.3``,
    ``transformer.h.0``, ``model.layers.11``), with the flat layer index.
    """
    fam, path = family_of(model)
    n = len(_get(_unwrap(model), path))
    w = width_of(model)
    return [Site(i, f"{path}.{i}", w, ("residual",), fam.kind) for i in range(n)]


def read_hidden(out: Any, where: str, channels: int) -> torch.Tensor:
    """The residual stream in a layer's output: the tensor itself, or element 0 of a tuple.

    Shapes:
        -> [batch, tokens, channels].
    """
    h = out[0] if isinstance(out, (tuple, list)) and len(out) > 0 else out
    if not isinstance(h, torch.Tensor) or h.ndim != 3 or h.shape[-1] != channels:
        got = f"Tensor{tuple(h.shape)}" if isinstance(h, torch.Tensor) else type(out).__name__
        raise MassactError(
            f"layer {where}: output {got} is not a residual stream [batch, tokens, {channels}]; "
            "this transformers version may have changed the layer's return value"
        )
    return h
