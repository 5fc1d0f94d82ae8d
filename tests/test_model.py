"""Loading helpers: the transformer's device and the run metadata's model name."""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook
from massact_nn.tracing.model import load_model, model_name, toy_path, transformer_device


def test_device_is_diffusers_answer_before_and_after_a_pipeline_call(tiny_flux):
    tr = tiny_flux.pipeline.transformer
    assert transformer_device(tiny_flux) == tr.device == torch.device("cpu")
    tiny_flux.pipeline("a", num_inference_steps=1, height=32, width=32, max_sequence_length=8,
                       output_type="latent")
    # A call leaves an empty hook registry on the transformer: still the fast answer.
    assert "_diffusers_hook" in vars(tr)
    assert transformer_device(tiny_flux) == tr.device


@pytest.fixture
def sentinel_device(monkeypatch, tiny_flux):
    """diffusers' ``device`` property made to answer ``meta``, to see who answered."""
    cls = type(tiny_flux.pipeline.transformer)
    monkeypatch.setattr(cls, "device", property(lambda self: torch.device("meta")))
    return tiny_flux


def test_device_without_hooks_is_the_first_parameters(sentinel_device):
    assert transformer_device(sentinel_device) == torch.device("cpu")


def test_device_with_any_diffusers_hook_is_asked_of_diffusers(sentinel_device):
    tr = sentinel_device.pipeline.transformer
    registry = HookRegistry.check_if_exists_or_initialize(tr)
    registry.register_hook(ModelHook(), "some_hook")
    try:
        # Group offloading's onload device is known only to its hook: diffusers must answer.
        assert transformer_device(sentinel_device) == torch.device("meta")
    finally:
        registry.remove_hook("some_hook")
    assert transformer_device(sentinel_device) == torch.device("cpu")


@pytest.mark.parametrize("level", ["block_level", "leaf_level"])
def test_device_under_real_group_offloading_is_the_onload_device(tiny_flux_dir, level):
    # Parameters stay on the CPU until a forward: only the hooks know the onload device. Leaf-level
    # offloading hooks submodules only, not the transformer itself. (Nothing runs forward here,
    # so a "cuda" onload device needs no GPU.)
    model = load_model(tiny_flux_dir)
    tr = model.pipeline.transformer
    tr.enable_group_offload(onload_device=torch.device("cuda"), offload_type=level, num_blocks_per_group=1)
    assert next(tr.parameters()).device == torch.device("cpu")
    assert transformer_device(model) == tr.device == torch.device("cuda")


def test_model_name_is_toy_for_the_toy_folder_by_any_spelling(tmp_path):
    class Pipe:
        config: dict = {}

        def __init__(self, name):
            self.name_or_path = name

    assert model_name(Pipe(str(toy_path()))) == "toy"
    assert model_name(Pipe(str(toy_path()) + "/")) == "toy"
    assert model_name(Pipe(str(toy_path() / "transformer" / ".."))) == "toy"
    copy = tmp_path / "toy"
    shutil.copytree(toy_path() / "transformer", copy / "transformer")
    assert model_name(Pipe(str(copy))) == str(copy)
    assert model_name(Pipe("org/name")) == "org/name"


def test_device_walk_is_remembered_per_transformer_until_its_parameters_move(monkeypatch):
    from massact_nn.tracing import model as mm

    walks = []
    real = mm._has_diffusers_hooks
    monkeypatch.setattr(mm, "_has_diffusers_hooks", lambda m: walks.append(m) or real(m))
    with torch.device("meta"):  # an accelerator stand-in: any device but the CPU is remembered
        tr = _Transformer(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    pipe = type("Pipe", (), {"transformer": tr})()
    assert [transformer_device(pipe) for _ in range(3)] == [torch.device("meta")] * 3
    assert len(walks) == 1
    # Group offloading moves the parameters to the offload device when applied: walked again,
    # and a hook found there makes diffusers' answer (the onload device) the result.
    tr.to_empty(device="cpu")
    registry = HookRegistry.check_if_exists_or_initialize(tr[1])
    registry.register_hook(ModelHook(), "some_hook")
    assert transformer_device(pipe) == torch.device("cuda") and len(walks) == 2
    assert transformer_device(pipe) == torch.device("cuda") and len(walks) == 3


class _Transformer(torch.nn.Sequential):
    @property
    def device(self) -> torch.device:  # diffusers' answer: group offloading's onload device
        return torch.device("cuda")


def test_cpu_parameters_are_walked_every_time(monkeypatch, tiny_flux):
    from massact_nn.tracing import model as mm

    walks = []
    real = mm._has_diffusers_hooks
    monkeypatch.setattr(mm, "_has_diffusers_hooks", lambda m: walks.append(m) or real(m))
    for _ in range(2):
        assert transformer_device(tiny_flux) == torch.device("cpu")
    assert len(walks) == 2


def test_folder_defaults_follow_the_file_and_are_copies(tmp_path):
    import json

    from massact_nn.tracing.generation import folder_defaults

    pipe = type("Pipe", (), {"name_or_path": str(tmp_path), "config": {}})()
    assert folder_defaults(pipe) == {}
    f = tmp_path / "massact.json"
    f.write_text(json.dumps({"call_defaults": {"height": 64, "extra": [1]}}))
    got = folder_defaults(pipe)
    assert got == {"height": 64, "extra": [1]}
    got["extra"].append(2)  # a caller's change must not reach the next run
    assert folder_defaults(pipe) == {"height": 64, "extra": [1]}
    f.write_text(json.dumps({"call_defaults": {"height": 128, "extra": [1, 2, 3]}}))
    assert folder_defaults(pipe) == {"height": 128, "extra": [1, 2, 3]}
    f.unlink()
    assert folder_defaults(pipe) == {}


def test_folder_defaults_cache_sees_a_same_size_rewrite_with_the_old_mtime(tmp_path, monkeypatch):
    import json
    import os
    import time

    from massact_nn.tracing import generation as g

    later = time.time_ns() + 10**10  # every file is "old": the cache is used
    monkeypatch.setattr(g.time, "time_ns", lambda: later)
    pipe = type("Pipe", (), {"name_or_path": str(tmp_path), "config": {}})()
    f = tmp_path / "massact.json"
    f.write_text(json.dumps({"steps": 4}))
    st = f.stat()
    assert g.folder_defaults(pipe) == {"steps": 4}
    reads = []
    monkeypatch.setattr(g, "_parse_defaults", lambda p: reads.append(p) or {"steps": -1})
    assert g.folder_defaults(pipe) == {"steps": 4} and reads == []  # cached
    monkeypatch.undo()
    monkeypatch.setattr(g.time, "time_ns", lambda: later)
    time.sleep(0.01)
    f.write_text(json.dumps({"steps": 8}))  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old modification time
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert g.folder_defaults(pipe) == {"steps": 8}  # the change time moved
