"""A release: a checkpoint that passed every DPO test, and the files it is published as.

The record (`Release`), the generated files (model card, `.eval_results/dpo.yaml`, `dpo_eval.json`) and
which of the checkpoint's own files are copied (`release_files`). No I/O: `publish` saves and pushes them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoints import (
    ADAPTER_CONFIG,
    TOKENIZER_FILES,
    Checkpoint,
    has_tokenizer,
    weight_files,
)
from .model_card import eval_results_yaml, model_card_text, versions
from .report_scopes import subset_results

if TYPE_CHECKING:
    from .results import EvalResult

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
EVAL_FILE = "dpo_eval.json"
EVAL_RESULTS_FILE = ".eval_results/dpo.yaml"
EVAL_SCHEMA = 1


@dataclass(frozen=True)
class Release:
    """A checkpoint that passed all its DPO tests, with everything needed to publish it.

    `result` and `eval_set_name` (its file name) are the default eval set's. `results` holds every eval
    set's result by set name, the default's among them, and `eval_sets` every set's record
    (`report.named_eval_set_records`), in run order; left empty, the release describes `result` alone.
    """

    checkpoint_id: str
    checkpoint: Checkpoint
    result: EvalResult
    passed_tests: list[str]
    eval_set_name: str
    tokenizer_dir: Path | None
    base_model: str | None = None
    results: Mapping[str, EvalResult] = field(default_factory=dict)
    eval_sets: Sequence[Mapping[str, Any]] = ()

    @property
    def folder_name(self) -> str:
        return self.checkpoint_id.replace("/", "--")

    @property
    def tag(self) -> str:
        return self.folder_name

    @property
    def commit_message(self) -> str:
        metrics = self.result.metrics
        shown = ", ".join(f"{name}={metrics[name]:.4g}" for name in ("rewards/accuracies", "rewards/margins", "loss"))
        return f"Release {self.checkpoint_id} ({shown})"

    @property
    def commit_description(self) -> str:
        tests = "\n".join(f"- {nodeid}" for nodeid in self.passed_tests)
        return f"All DPO tests passed (pytest-dpo), eval set sha256 {self.result.eval_set_sha256}:\n{tests}"


def release_files(release: Release) -> dict[str, Path | bytes]:
    """Every file of the release by its path in the published folder: copied weights and tokenizer, generated card and report."""
    source = release.checkpoint.path
    files: dict[str, Path | bytes] = {}
    if release.checkpoint.is_adapter:
        names = [*weight_files(source), ADAPTER_CONFIG]
    else:
        names = weight_files(source) + list(MODEL_FILES)
    for name in names:
        if (source / name).exists():
            files[name] = source / name
    tokenizer_source = source if has_tokenizer(source) else release.tokenizer_dir
    for name in TOKENIZER_FILES:
        if tokenizer_source is not None and (tokenizer_source / name).exists():
            files[name] = tokenizer_source / name
    settings = release.result.settings
    summaries = eval_set_summaries(release)
    files["README.md"] = model_card_text(
        model_name=release.checkpoint_id,
        base_model=release.base_model,
        library_name="peft" if release.checkpoint.is_adapter else "transformers",
        metrics=release.result.metrics,
        eval_set_name=release.eval_set_name,
        eval_set_sha256=release.result.eval_set_sha256,
        eval_set_rows=release.result.num_examples + len(release.result.dropped_rows),
        settings=settings,
        passed_tests=release.passed_tests,
        eval_sets=summaries,
    ).encode()
    files[EVAL_RESULTS_FILE] = eval_results_yaml(
        metrics=release.result.metrics,
        eval_set_name=release.eval_set_name,
        eval_set_sha256=release.result.eval_set_sha256,
        settings=settings,
        eval_sets=summaries,
    ).encode()
    files[EVAL_FILE] = (json.dumps(release_report(release, summaries), indent=2) + "\n").encode()
    return files


def eval_set_summaries(release: Release) -> list[dict[str, Any]]:
    """Every eval set of a release with its numbers, in run order: the set's record (`name`, `path`, `file`,
    `sha256`, `rows`, `format`, `revision`, `options`) with `scored_rows`, `dropped_rows`, `metrics` and, for a
    set split into subsets, `subsets` (name → `scored_rows`, `metrics`; 0 and empty for a subset whose rows
    are all dropped). Empty for a release without eval-set records."""
    summaries = []
    for record in release.eval_sets:
        result = release.results[record["name"]]
        summary = dict(record) | {
            "scored_rows": result.num_examples,
            "dropped_rows": list(result.dropped_rows),
            "metrics": dict(result.metrics),
        }
        if result.subset_labels is not None:
            summary["subsets"] = {name: _subset_summary(subset) for name, subset in subset_results(result).items()}
        summaries.append(summary)
    return summaries


def _subset_summary(subset: EvalResult | None) -> dict[str, Any]:
    if subset is None:
        return {"scored_rows": 0, "metrics": {}}
    return {"scored_rows": subset.num_examples, "metrics": dict(subset.metrics)}


def release_report(release: Release, summaries: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The machine-readable report of one released checkpoint (`dpo_eval.json`).

    Its `metrics` and `eval_set` are the default eval set's; `eval_sets` (when the release has eval-set
    records) holds every set's summary by set name (`eval_set_summaries`, computed here unless given).
    """
    result = release.result
    summaries = eval_set_summaries(release) if summaries is None else summaries
    return {
        "schema": EVAL_SCHEMA,
        "checkpoint": release.checkpoint_id,
        "checkpoint_path": str(release.checkpoint.path),
        "step": release.checkpoint.step,
        "reference": result.reference,
        "metrics": result.metrics,
        "settings": result.settings,
        "eval_set": {
            "name": release.eval_set_name,
            "sha256": result.eval_set_sha256,
            "scored_rows": result.num_examples,
            "dropped_rows": result.dropped_rows,
        },
        **({"eval_sets": {summary["name"]: dict(summary) for summary in summaries}} if summaries else {}),
        "verdict": {"passed": True, "tests": release.passed_tests},
        "versions": versions(),
    }
