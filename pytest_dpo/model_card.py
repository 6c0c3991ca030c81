"""Model card and eval-result files for a published checkpoint, built with huggingface_hub's own data classes.

Pure text building: no network, no files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .metric_table import METRIC_NAMES

TASK_TYPE = "text-generation"
DATASET_TYPE = "preference"
TAGS = ("dpo", "trl", "pytest-dpo")
_VERSIONED = ("pytest-dpo", "torch", "transformers", "peft", "huggingface_hub")


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
) -> str:
    """The `README.md` of a published checkpoint: YAML metadata with `model-index` eval results, and a summary.

    The metadata round-trips through `huggingface_hub.ModelCard`: every metric
    is one model-index `EvalResult` on the frozen eval set, identified by name
    and content hash.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    eval_results = [
        EvalResult(
            task_type=TASK_TYPE,
            dataset_type=DATASET_TYPE,
            dataset_name=eval_set_name,
            dataset_revision=eval_set_sha256,
            metric_type=name,
            metric_name=f"eval_{name}",
            metric_value=float(metrics[name]),
            metric_config=f"beta={settings.get('beta')}, loss_type={','.join(settings.get('loss_type', []))}",
        )
        for name in METRIC_NAMES
        if name in metrics
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

Settings: {settings_text}.

## Tests passed

{tests}

## Versions

{installed}
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def eval_results_yaml(
    *, metrics: Mapping[str, float], eval_set_name: str, eval_set_sha256: str, settings: Mapping[str, Any]
) -> str:
    """The `.eval_results/*.yaml` file (huggingface_hub's newer format): one entry per metric."""
    import yaml
    from huggingface_hub import EvalResultEntry, eval_result_entries_to_yaml

    notes = ", ".join(f"{key}={value}" for key, value in settings.items())
    entries = [
        EvalResultEntry(
            dataset_id=eval_set_name,
            task_id=name,
            value=float(metrics[name]),
            dataset_revision=eval_set_sha256,
            notes=notes,
        )
        for name in METRIC_NAMES
        if name in metrics
    ]
    return yaml.safe_dump(eval_result_entries_to_yaml(entries), sort_keys=False)
