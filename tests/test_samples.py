"""`--dpo-samples N`: policy and reference completions for the first N eval prompts, in the report and a fixture."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import huggingface_hub  # noqa: F401
import jsonschema
import peft
import pytest
import torch
import transformers

from pytest_dpo.evalset import load_eval_set
from pytest_dpo.report_files import report_schema
from pytest_dpo.samples import GenerationError, GenerationSettings
from pytest_dpo.tokenization import tokenize_eval_set

from .fixture_paths import BASE, EVAL_CONVERSATIONAL, EVAL_STANDARD, FULL_RUN, LORA_RUN

pytest_plugins = ["pytester"]

NEW_TOKENS = 6


def greedy(model: torch.nn.Module, tokenizer: object, prompt_ids: list[int]) -> str:
    """What transformers' own greedy decoding writes after the prompt, independently of pytest-dpo."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        output = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                                pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, len(prompt_ids):], skip_special_tokens=True)


def prompt_ids(tokenizer_dir: Path, eval_file: Path, count: int) -> list[list[int]]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rows = tokenize_eval_set(load_eval_set(eval_file), tokenizer, 1024, "keep_start").rows[:count]
    return [row.prompt_ids for row in rows]


def test_adapter_run_reports_policy_and_base_completions_as_transformers_writes_them(pytester: pytest.Pytester) -> None:
    pytester.makeini(f"[pytest]\ndpo_report = out\ndpo_samples = 2\ndpo_generation = max_new_tokens={NEW_TOKENS}\n")
    pytester.makepyfile(test_m="def test_m(dpo_metrics):\n    assert dpo_metrics['loss'] > 0\n")
    result = pytester.runpytest(f"--dpo-checkpoint={LORA_RUN}", f"--dpo-eval-set={EVAL_CONVERSATIONAL}", "--dpo-lock=none")
    result.assert_outcomes(passed=3)
    report = json.loads((pytester.path / "out" / "dpo_report.json").read_text())
    jsonschema.validate(report, report_schema())

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(BASE))
    prompts = prompt_ids(BASE, EVAL_CONVERSATIONAL, 2)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(BASE), dtype=torch.float32).eval()
    reference_texts = [greedy(base, tokenizer, ids) for ids in prompts]
    for checkpoint in report["checkpoints"]:
        adapter = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(str(BASE), dtype=torch.float32), checkpoint["path"]
        ).eval()
        assert [s["row"] for s in checkpoint["samples"]] == [0, 1]
        assert [s["policy"] for s in checkpoint["samples"]] == [greedy(adapter, tokenizer, ids) for ids in prompts]
        assert [s["reference"] for s in checkpoint["samples"]] == reference_texts
        assert all(s["prompt"] == tokenizer.decode(ids, skip_special_tokens=True)
                   for s, ids in zip(checkpoint["samples"], prompts))
    assert any(s["policy"] != s["reference"] for c in report["checkpoints"] for s in c["samples"])
    markdown = (pytester.path / "out" / "dpo_summary.md").read_text()
    for checkpoint in report["checkpoints"]:
        assert f"## Sample completions: {checkpoint['id']}" in markdown
    assert markdown.count("| 0 | ") == len(report["checkpoints"]) and markdown.count("| 1 | ") == len(report["checkpoints"])


def test_samples_travel_from_xdist_workers_to_the_controller_report(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_m="def test_m(dpo_metrics):\n    assert dpo_metrics['loss'] > 0\n")
    result = pytester.runpytest(
        "-n", "2", f"--dpo-checkpoint={FULL_RUN}", f"--dpo-reference={BASE}", f"--dpo-eval-set={EVAL_STANDARD}",
        "--dpo-samples=1", f"--dpo-generation=max_new_tokens={NEW_TOKENS}", "--dpo-report=out", "--dpo-lock=none",
    )
    result.assert_outcomes(passed=3)
    report = json.loads((pytester.path / "out" / "dpo_report.json").read_text())
    assert [len(c["samples"]) for c in report["checkpoints"]] == [1, 1, 1]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(BASE))
    (ids,) = prompt_ids(BASE, EVAL_STANDARD, 1)
    last = report["checkpoints"][-1]
    model = transformers.AutoModelForCausalLM.from_pretrained(last["path"], dtype=torch.float32).eval()
    assert last["samples"][0]["policy"] == greedy(model, tokenizer, ids)


def test_sampled_generation_is_repeatable_and_the_fixture_gives_the_samples(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_s=textwrap.dedent(
            """
            import json, pathlib

            def test_s(dpo_samples, dpo_checkpoint):
                assert [s.row for s in dpo_samples] == [0, 1, 2]
                path = pathlib.Path(f"samples-{dpo_checkpoint.name}.json")
                texts = [s.policy for s in dpo_samples]
                if path.exists():
                    assert json.loads(path.read_text()) == texts
                path.write_text(json.dumps(texts))
            """
        )
    )
    args = [
        f"--dpo-checkpoint={FULL_RUN}/checkpoint-6", f"--dpo-reference={BASE}", f"--dpo-eval-set={EVAL_STANDARD}",
        "--dpo-samples=3", "--dpo-generation=do_sample=true", "--dpo-generation=temperature=1.5",
        "--dpo-generation=seed=7", "--dpo-generation=max_new_tokens=12", "--dpo-lock=none",
    ]
    pytester.runpytest(*args).assert_outcomes(passed=1)
    pytester.runpytest(*args).assert_outcomes(passed=1)


def test_the_samples_fixture_skips_without_samples(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_s="def test_s(dpo_samples):\n    pass\n")
    result = pytester.runpytest(
        f"--dpo-checkpoint={FULL_RUN}/checkpoint-6", f"--dpo-reference={BASE}", f"--dpo-eval-set={EVAL_STANDARD}",
        "--dpo-lock=none", "-rs",
    )
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no samples: pass --dpo-samples N*"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dpo-samples=-1"], "--dpo-samples / dpo_samples: '-1' is not a count*"),
        (["--dpo-samples=many"], "--dpo-samples / dpo_samples: 'many' is not a count*"),
        (["--dpo-samples=2", "--dpo-generation=max_new_tokens"], "--dpo-generation: 'max_new_tokens' is not key=value*"),
        (["--dpo-samples=2", "--dpo-generation=colour=red"], "--dpo-generation / dpo_generation: colour is not a *GenerationConfig field*"),
        (["--dpo-samples=2", "--dpo-generation=max_new_tokens=-3"], "--dpo-generation / dpo_generation: *max_new_tokens*"),
    ],
)
def test_bad_sample_settings_are_usage_errors(pytester: pytest.Pytester, args: list[str], message: str) -> None:
    pytester.makepyfile(test_m="def test_m(dpo_metrics):\n    pass\n")
    result = pytester.runpytest(
        f"--dpo-checkpoint={FULL_RUN}/checkpoint-6", f"--dpo-reference={BASE}", f"--dpo-eval-set={EVAL_STANDARD}",
        "--dpo-lock=none", *args,
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {message}"])


def test_generation_lines_read_json_values_and_keep_greedy_defaults() -> None:
    settings = GenerationSettings.from_lines(["do_sample = true", "top_p=0.9", "seed=3", "stop_strings=END"], "dpo_generation")
    assert settings.options == {"max_new_tokens": 64, "do_sample": True, "top_p": 0.9, "stop_strings": "END"}
    assert settings.seed == 3
    assert GenerationSettings.from_lines([], "x").options == {"max_new_tokens": 64, "do_sample": False}
    with pytest.raises(GenerationError, match="seed=1.5 is not an integer"):
        GenerationSettings.from_lines(["seed=1.5"], "dpo_generation")
