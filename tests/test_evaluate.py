"""`evaluate()` and `python -m pytest_dpo` as a user calls them: defaults, scoring details, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pytest_dpo import CheckpointError, EvalSetError, SettingsError, evaluate
from pytest_dpo.__main__ import main
from pytest_dpo import scoring
from pytest_dpo.scoring import LogitTransform, score
from pytest_dpo.tokenization import TokenizedEvalSet, TokenizedRow

from .fixture_paths import BASE, EVAL_CONVERSATIONAL, EVAL_STANDARD, FULL_RUN, LORA_RUN


def test_result_has_trl_metric_names_and_per_example_arrays_in_row_order() -> None:
    result = evaluate(FULL_RUN / "checkpoint-6", EVAL_STANDARD, reference=BASE, max_length=48)
    assert set(result.metrics) == {
        "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
        "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy",
    }
    rows = result.per_example.rows.tolist()
    assert rows == sorted(rows)
    assert result.dropped_rows and not set(result.dropped_rows) & set(rows)
    assert len(rows) + len(result.dropped_rows) == 24
    assert result.settings["dtype"] == "float32" and result.settings["device"] == "cpu"
    assert torch.allclose(result.per_example.margins, result.per_example.chosen_rewards - result.per_example.rejected_rewards)


def test_later_checkpoints_of_the_fixture_run_learned_the_preference() -> None:
    early = evaluate(FULL_RUN / "checkpoint-2", EVAL_STANDARD, reference=BASE)
    late = evaluate(FULL_RUN / "checkpoint-6", EVAL_STANDARD, reference=BASE)
    assert late.metrics["rewards/margins"] > early.metrics["rewards/margins"] + 0.1
    assert late.metrics["rewards/accuracies"] > 0.5


def test_lora_reference_defaults_to_base_and_reference_adapter_is_used_when_given() -> None:
    checkpoint = LORA_RUN / "checkpoint-6"
    against_base = evaluate(checkpoint, EVAL_STANDARD)
    against_base_explicit = evaluate(checkpoint, EVAL_STANDARD, reference=BASE)
    against_itself = evaluate(checkpoint, EVAL_STANDARD, reference=checkpoint)
    against_earlier = evaluate(checkpoint, EVAL_STANDARD, reference=LORA_RUN / "checkpoint-2")
    assert torch.allclose(
        against_base.per_example.reference_chosen_logps, against_base_explicit.per_example.reference_chosen_logps, atol=1e-5
    )
    # An adapter compared with itself earns no reward: the trap TRL falls into when it copies the adapter.
    assert against_itself.per_example.margins.abs().max().item() < 1e-4
    assert not torch.allclose(
        against_earlier.per_example.reference_chosen_logps, against_base.per_example.reference_chosen_logps, atol=1e-3
    )


def test_chunked_lm_head_gives_the_same_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    whole = evaluate(FULL_RUN / "checkpoint-4", EVAL_STANDARD, reference=BASE)
    # A budget of one vocabulary row per chunk forces one token per LM-head chunk.
    monkeypatch.setattr(scoring, "LOGITS_BUDGET", 1)
    chunked = evaluate(FULL_RUN / "checkpoint-4", EVAL_STANDARD, reference=BASE)
    for name in ("policy_chosen_logps", "policy_rejected_logps", "chosen_entropy_sum", "chosen_logits_sum"):
        assert torch.allclose(getattr(whole.per_example, name), getattr(chunked.per_example, name), atol=1e-5), name


def _tiny_model(family: str) -> torch.nn.Module:
    import transformers

    common = {
        "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64,
    }
    configs = {
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, {"final_logit_softcapping": 0.5, "head_dim": 8}),
        "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM, {"logits_scaling": 0.25}),
        "cohere": (transformers.CohereConfig, transformers.CohereForCausalLM, {"logit_scale": 3.0}),
    }
    config_class, model_class, extra = configs[family]
    torch.manual_seed(0)
    return model_class(config_class(**common, **extra)).eval()


@pytest.mark.parametrize("family", ["gemma2", "granite", "cohere"])
def test_model_family_logit_scaling_matches_the_models_own_logits(family: str) -> None:
    model = _tiny_model(family)
    transform = LogitTransform.from_config(model.config)
    assert (transform.logit_scale, transform.softcap) != (1.0, None)
    generator = torch.Generator().manual_seed(1)
    rows = [
        TokenizedRow(i, *(torch.randint(3, 64, (n,), generator=generator).tolist() for n in (4 + i, 3 + i, 5)))
        for i in range(3)
    ]
    scores = score(model, TokenizedEvalSet(rows, []), batch_size=2, max_length=None, truncation_mode="keep_start")
    for index, row in enumerate(rows):
        ids = torch.tensor([row.prompt_ids + row.chosen_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        targets = ids[0, 1:]
        expected = log_probs[len(row.prompt_ids) - 1 :].gather(-1, targets[len(row.prompt_ids) - 1 :, None]).sum()
        assert abs(scores.chosen_logps[index].item() - expected.item()) < 1e-4
        # The logit sums too (for scaled logits, one dot product with the head's weight-row sum per token).
        expected_logits = logits[len(row.prompt_ids) - 1 :].mean(dim=-1).sum()
        assert abs(scores.chosen_logits_sum[index].item() - expected_logits.item()) < 1e-5


def test_tokenizer_without_eos_is_refused_with_the_fix(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint-1"
    shutil.copytree(FULL_RUN / "checkpoint-2", checkpoint)
    config_file = checkpoint / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["eos_token"] = None
    config_file.write_text(json.dumps(config))
    tokenizer_file = checkpoint / "tokenizer.json"
    tokenizer = json.loads(tokenizer_file.read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] != "</s>"]
    tokenizer_file.write_text(json.dumps(tokenizer))
    with pytest.raises(EvalSetError, match=r"checkpoint-1 has no EOS token.*eos_token"):
        evaluate(checkpoint, EVAL_STANDARD, reference=BASE)


def test_conversational_rows_need_a_chat_template(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint-1"
    shutil.copytree(FULL_RUN / "checkpoint-2", checkpoint)
    (checkpoint / "chat_template.jinja").unlink()
    config_file = checkpoint / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    with pytest.raises(EvalSetError, match="need a chat template"):
        evaluate(checkpoint, EVAL_CONVERSATIONAL, reference=BASE)


def test_every_row_dropped_is_an_error_that_says_raise_max_length() -> None:
    with pytest.raises(EvalSetError, match="Raise max_length"):
        evaluate(FULL_RUN / "checkpoint-2", EVAL_STANDARD, reference=BASE, max_length=3)


def test_a_run_folder_is_not_one_checkpoint() -> None:
    with pytest.raises(CheckpointError, match=r"holds 3 \(checkpoint-2, checkpoint-4, checkpoint-6\)"):
        evaluate(FULL_RUN, EVAL_STANDARD, reference=BASE)


def test_unknown_loss_type_is_refused_before_any_model_is_loaded() -> None:
    with pytest.raises(SettingsError, match="Unknown loss_type 'sigmoidd'"):
        evaluate(FULL_RUN / "checkpoint-2", EVAL_STANDARD, reference=BASE, loss_type="sigmoidd")


def test_cli_prints_the_metrics_table_for_each_checkpoint_of_a_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    report = tmp_path / "metrics.json"
    code = main(["evaluate", str(FULL_RUN), "--eval-set", str(EVAL_STANDARD), "--reference", str(BASE), "--json", str(report)])
    out = capsys.readouterr().out
    assert code == 0
    header = next(line for line in out.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "checkpoint-2", "checkpoint-4", "checkpoint-6"]
    table = out[out.index("metric") :].splitlines()
    assert len(table) == 14 and all(len(line) <= 80 for line in table)
    saved = json.loads(report.read_text())
    assert [entry["checkpoint"] for entry in saved] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_cli_reports_bad_settings_as_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["evaluate", str(FULL_RUN), "--eval-set", str(EVAL_STANDARD), "--beta", "0"])
    assert code == 2
    assert "beta must be > 0" in capsys.readouterr().err


def test_lm_head_never_materialises_more_than_an_eighth_of_the_full_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    from transformers import AutoTokenizer

    from pytest_dpo.evalset import load_eval_set
    from pytest_dpo.tokenization import tokenize_eval_set

    model = AutoModelForCausalLM.from_pretrained(str(FULL_RUN / "checkpoint-4"))
    tokenizer = AutoTokenizer.from_pretrained(str(FULL_RUN / "checkpoint-4"))
    tokenized = tokenize_eval_set(load_eval_set(EVAL_STANDARD), tokenizer, 1024, "keep_start")
    vocab = model.lm_head.weight.shape[0]
    events: list[tuple[str, int]] = []
    head_logits = scoring._head_logits

    def recording_head_logits(head: torch.nn.Module, hidden: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
        logits = head_logits(head, hidden, buffer)
        events.append(("chunk", logits.numel() if buffer is None else buffer.numel()))
        return logits

    monkeypatch.setattr(scoring, "_head_logits", recording_head_logits)
    model.model.register_forward_hook(
        lambda module, args, output: events.append(("batch", output.last_hidden_state.shape[0] * output.last_hidden_state.shape[1]))
    )
    score(model, tokenized, batch_size=8, max_length=1024, truncation_mode="keep_start")
    full = 0
    for kind, size in events:
        if kind == "batch":
            full = size * vocab
        else:
            # logits and their softmax are alive together: twice the chunk, against this batch's full logits
            assert 2 * size <= full / 8, (size, full)
    assert [kind for kind, _ in events].count("chunk") > [kind for kind, _ in events].count("batch")
