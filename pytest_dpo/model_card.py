"""Model card and eval-result files for a published checkpoint, built with huggingface_hub's own data classes.

Pure text building: no network, no files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .metric_table import METRIC_NAMES
from .report import SUMMARY_COLUMNS

TASK_TYPE = "text-generation"
DATASET_TYPE = "preference"
TAGS = ("dpo", "trl", "pytest-dpo")
_VERSIONED = ("pytest-dpo", "torch", "transformers", "peft", "huggingface_hub")
# The metrics of the card's eval-set table, in the report's column order.
_SUMMARY_NAMES = [metric.name for metric in SUMMARY_COLUMNS]


def versions() -> dict[str, str]:
    """Installed versions of the packages that shape the numbers, read without importing them."""
    found = {}
    for package in _VERSIONED:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def model_card_text(
    *,
    model_name: str,
    base_model: str | None,
    library_name: str,
    metrics: Mapping[str, float],
    eval_set_name: str,
    eval_set_sha256: str,
    eval_set_rows: int,
    settings: Mapping[str, Any],
    passed_tests: Sequence[str],
    eval_sets: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The `README.md` of a published checkpoint: YAML metadata with `model-index` eval results, and a summary.

    The metadata round-trips through `huggingface_hub.ModelCard`: every metric
    is one model-index `EvalResult` on the frozen eval set, identified by name
    and content hash. `metrics` and `eval_set_*` are the default eval set's.

    `eval_sets` (`publish.eval_set_summaries`: each set's `name`, `file`, `sha256`, `revision`, `rows`,
    `scored_rows`, `metrics`, and `subsets` when split) adds a table of every set and subset with its
    summary metrics when there are several sets, subsets or a Hub revision to show; with several sets the
    model-index has every set's metrics, each set its own dataset config (its name in the run).
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    metric_config = f"beta={settings.get('beta')}, loss_type={','.join(settings.get('loss_type', []))}"
    scored = (
        [(summary["file"], summary["name"], summary["sha256"], summary["metrics"]) for summary in eval_sets]
        if len(eval_sets) > 1
        else [(eval_set_name, None, eval_set_sha256, metrics)]
    )
    eval_results = [
        EvalResult(
            task_type=TASK_TYPE,
            dataset_type=DATASET_TYPE,
            dataset_name=file,
            dataset_config=config,
            dataset_revision=sha256,
            metric_type=name,
            metric_name=f"eval_{name}",
            metric_value=float(values[name]),
            metric_config=metric_config,
        )
        for file, config, sha256, values in scored
        for name in METRIC_NAMES
        if name in values
    ]
    data = ModelCardData(
        model_name=model_name,
        base_model=base_model,
        library_name=library_name,
        tags=list(TAGS),
        eval_results=eval_results,
    )
    rows = "\n".join(f"| `{name}` | {metrics[name]:.6g} |" for name in METRIC_NAMES if name in metrics)
    tests = "\n".join(f"- `{nodeid}`" for nodeid in passed_tests) or "- (none)"
    settings_text = ", ".join(f"{key}={value}" for key, value in settings.items())
    installed = ", ".join(f"{package} {number}" for package, number in versions().items())
    body = f"""
# {model_name}

Released by [pytest-dpo](https://pypi.org/project/pytest-dpo/): every DPO test of this checkpoint passed.

## DPO evaluation

Eval set `{eval_set_name}` ({eval_set_rows} rows), sha256 `{eval_set_sha256}`.
Metrics are TRL's DPO eval metrics, averaged over the whole eval set.

| metric | value |
|---|---|
{rows}
{_eval_sets_table(eval_sets)}
Settings: {settings_text}.

## Tests passed

{tests}

## Versions

{installed}
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def _eval_sets_table(eval_sets: Sequence[Mapping[str, Any]]) -> str:
    """Every eval set and subset × the summary metrics, as Markdown after a blank line; empty for one set
    without subsets or a Hub revision (the lines above say everything)."""
    with_revision = any(summary["revision"] for summary in eval_sets)
    if len(eval_sets) <= 1 and not with_revision and not any("subsets" in summary for summary in eval_sets):
        return ""
    facts_header = "| eval set | rows | sha256 | " + ("revision | " if with_revision else "")
    facts_rule = "|---|--:|---|" + ("---|" if with_revision else "")
    lines = [
        "",
        "### Eval sets",
        "",
        facts_header + " | ".join(["scored", *_SUMMARY_NAMES]) + " |",
        facts_rule + "--:|" * (1 + len(_SUMMARY_NAMES)),
    ]
    for summary in eval_sets:
        own = "".join(f", {key}={value}" for key, value in summary["options"].items())
        facts = [f"`{summary['name']}` (`{summary['file']}`{own})", str(summary["rows"]), f"`{summary['sha256'][:12]}`"]
        if with_revision:
            facts.append(f"`{summary['revision'][:12]}`" if summary["revision"] else "—")
        lines.append(_metrics_row(facts, summary["scored_rows"], summary["metrics"]))
        for subset, numbers in summary.get("subsets", {}).items():
            label = f"`{summary['name']}` / `{subset}`"
            lines.append(_metrics_row([label, *[""] * (len(facts) - 1)], numbers["scored_rows"], numbers["metrics"]))
    return "\n".join(lines) + "\n"


def _metrics_row(facts: list[str], scored_rows: int, metrics: Mapping[str, float]) -> str:
    values = [f"{metrics[name]:.4g}" if name in metrics else "—" for name in _SUMMARY_NAMES]
    return "| " + " | ".join([*facts, str(scored_rows), *values]) + " |"


def eval_results_yaml(
    *,
    metrics: Mapping[str, float],
    eval_set_name: str,
    eval_set_sha256: str,
    settings: Mapping[str, Any],
    eval_sets: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The `.eval_results/*.yaml` file (huggingface_hub's newer format): one entry per metric of the default
    eval set, or, with several `eval_sets` (as `model_card_text` takes them), per metric of every set, its
    notes naming the set."""
    import yaml
    from huggingface_hub import EvalResultEntry, eval_result_entries_to_yaml

    notes = ", ".join(f"{key}={value}" for key, value in settings.items())
    scored = (
        [
            (summary["file"], f"eval set {summary['name']}; {notes}", summary["sha256"], summary["metrics"])
            for summary in eval_sets
        ]
        if len(eval_sets) > 1
        else [(eval_set_name, notes, eval_set_sha256, metrics)]
    )
    entries = [
        EvalResultEntry(
            dataset_id=file,
            task_id=name,
            value=float(values[name]),
            dataset_revision=sha256,
            notes=set_notes,
        )
        for file, set_notes, sha256, values in scored
        for name in METRIC_NAMES
        if name in values
    ]
    return yaml.safe_dump(eval_result_entries_to_yaml(entries), sort_keys=False)
