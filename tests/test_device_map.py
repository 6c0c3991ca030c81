"""`--dpo-device-map`: accelerate's big-model placement instead of one device (here: CPU only)."""

from __future__ import annotations

import sys

import pytest
import torch

from pytest_dpo import CheckpointError, SettingsError, evaluate
from pytest_dpo.loading import LoadOptions, load_causal_lm

from .fixture_paths import BASE, EVAL_STANDARD, FULL_RUN, LORA_RUN


@pytest.mark.parametrize("checkpoint", [FULL_RUN / "checkpoint-6", LORA_RUN / "checkpoint-6"], ids=["full", "lora"])
def test_device_map_gives_the_same_numbers(checkpoint: object) -> None:
    reference = BASE if "full" in str(checkpoint) else None
    whole = evaluate(checkpoint, EVAL_STANDARD, reference=reference, device="cpu")
    mapped = evaluate(checkpoint, EVAL_STANDARD, reference=reference, device="cpu", device_map="auto")
    for name in ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps"):
        assert torch.allclose(getattr(whole.per_example, name), getattr(mapped.per_example, name), atol=1e-5), name
    assert mapped.settings["device_map"] == "auto"


def test_device_map_reaches_from_pretrained_and_the_model_is_not_moved(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    calls: list[dict[str, object]] = []
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls: type, *args: object, **kwargs: object) -> object:
        calls.append(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    moves: list[object] = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moves.append(a) or self)
    load_causal_lm(str(BASE), device="cpu", dtype=torch.float32, options=LoadOptions(device_map="auto"))
    assert calls[-1]["device_map"] == "auto" and moves == []
    load_causal_lm(str(BASE), device="cpu", dtype=torch.float32)
    assert "device_map" not in calls[-1] and moves == [("cpu",)]


def test_unknown_device_map_names_the_choices() -> None:
    with pytest.raises(SettingsError, match="Unknown device_map 'everywhere'. Choose from: auto, balanced"):
        evaluate(FULL_RUN / "checkpoint-6", EVAL_STANDARD, reference=BASE, device_map="everywhere")


def test_device_map_without_accelerate_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "accelerate", None)
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real_find_spec(name, *a))
    with pytest.raises(CheckpointError, match=r"needs accelerate .*pip install 'pytest-dpo\[big\]'"):
        load_causal_lm(str(BASE), device="cpu", dtype=torch.float32, options=LoadOptions(device_map="auto"))
