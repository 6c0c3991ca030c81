"""Differential test: `tokenize_eval_set` against TRL 1.16's own `DPOTrainer._prepare_dataset`.

Hypothesis writes preference rows, as a user has them, to a `.jsonl` file.
TRL reads that file through `datasets.load_dataset("json")`, as its users do,
and tokenizes it with its real `_prepare_dataset`; pytest-dpo reads the same
file with `load_eval_set`. Token ids and dropped rows must agree exactly, and
where TRL fails on a file, `load_eval_set` must refuse it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import datasets
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_dpo.evalset import EvalSetError, load_eval_set
from pytest_dpo.tokenization import tokenize_eval_set
from tests.fixture_paths import FIXTURES

datasets.disable_progress_bars()
pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated.*:FutureWarning")  # DPOConfig's own deprecations

# A Qwen-style template: tools rendered with `tojson` (so key order and number types show), an empty thinking
# block after the generation prompt when `enable_thinking` is false, and a `budget` variable printed as is.
QWEN_STYLE_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- if budget is defined %}{{- '<|im_start|>system\\nbudget=' ~ budget ~ '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message.role == 'system') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
EOS = "</s>"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The fixture tokenizer (adds BOS, ChatML-like template) and a copy without BOS and with the Qwen-style template."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("qwen_style") / "tokenizer"
    shutil.copytree(FIXTURES / "tokenizer", folder)
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    spec["post_processor"] = None  # no BOS, as Qwen tokenizers
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    (folder / "chat_template.jinja").write_text(QWEN_STYLE_TEMPLATE, encoding="utf-8")
    fixture = AutoTokenizer.from_pretrained(str(FIXTURES / "tokenizer"))
    qwen_style = AutoTokenizer.from_pretrained(str(folder))
    assert fixture("a")["input_ids"][0] == fixture.bos_token_id
    assert qwen_style("a")["input_ids"][0] != qwen_style.bos_token_id
    return {"fixture": fixture, "qwen_style": qwen_style}


# --------------------------------------------------------------------------------------------
# Rows as a user writes them
# --------------------------------------------------------------------------------------------

_piece = st.sampled_from(["a", "b", "ab", " ", "  ", "é", "✓", "日本", "🙂", "\n", "x y", EOS, "e\u0301"])
text = st.lists(_piece, min_size=1, max_size=6).map("".join)
prompt_text = st.tuples(st.lists(_piece, max_size=5).map("".join), st.sampled_from(["", " ", "  "])).map("".join)


def message(role: str) -> st.SearchStrategy[dict[str, str]]:
    return st.builds(lambda content: {"role": role, "content": content}, text)


@st.composite
def conversation_prompt(draw: st.DrawFn) -> list[dict[str, str]]:
    system = draw(st.lists(message("system"), max_size=1))
    turns = draw(st.lists(st.tuples(message("user"), message("assistant")), max_size=2))
    return system + [item for pair in turns for item in pair] + [draw(message("user"))]


@st.composite
def standard_row(draw: st.DrawFn, implicit: bool) -> dict[str, Any]:
    chosen, rejected = draw(st.lists(text, min_size=2, max_size=2, unique=True))
    if implicit:
        prefix = draw(prompt_text)
        return {"chosen": prefix + chosen, "rejected": prefix + rejected}
    return {"prompt": draw(prompt_text), "chosen": chosen, "rejected": rejected}


@st.composite
def conversational_row(draw: st.DrawFn, implicit: bool) -> dict[str, Any]:
    prompt = draw(conversation_prompt())
    chosen, rejected = draw(st.lists(text, min_size=2, max_size=2, unique=True))
    chosen_messages = [{"role": "assistant", "content": chosen}]
    rejected_messages = [{"role": "assistant", "content": rejected}]
    if implicit:
        return {"chosen": prompt + chosen_messages, "rejected": prompt + rejected_messages}
    return {"prompt": prompt, "chosen": chosen_messages, "rejected": rejected_messages}


@st.composite
def tool(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(st.sampled_from(["city", "unit", "day"]), min_size=1, max_size=2, unique=True))
    function = {
        "name": draw(st.sampled_from(["get_weather", "lookup"])),
        "description": draw(text),
        "parameters": {"type": "object", "properties": {name: {"type": "string"} for name in names}, "required": names[:1]},
    }
    tool = {"type": "function", "function": function}
    if draw(st.booleans()):  # hand-written files do not keep one key order
        tool = {"function": dict(reversed(list(function.items()))), "type": "function"}
    return tool


@st.composite
def tools_cell(draw: st.DrawFn, tools_form: str) -> Any:
    """Mostly one or two tools; sometimes none (null) or an empty list."""
    kind = draw(st.integers(0, 5))
    tools = None if kind == 0 else [] if kind == 1 else draw(st.lists(tool(), min_size=1, max_size=2))
    if tools is not None and tools_form == "json":
        return json.dumps(tools)  # TRL's documented form
    return tools


kwargs_cell = st.fixed_dictionaries(
    {}, optional={"enable_thinking": st.booleans(), "budget": st.one_of(st.integers(0, 3), st.sampled_from([0.5, 2.0]))}
)
ROW_FORMATS = ["standard", "implicit"] + ["conversational", "implicit conversational"] * 2


@st.composite
def eval_files(draw: st.DrawFn) -> tuple[str, list[dict[str, Any]]]:
    """A format and its rows: a `tools` column (lists or JSON strings), `chat_template_kwargs`, extra columns.

    Conversational rows, where TRL passes tools and kwargs to the chat template, are drawn twice as often.
    """
    row_format = draw(st.sampled_from(ROW_FORMATS))
    make_row = conversational_row if "conversational" in row_format else standard_row
    rows = draw(st.lists(make_row("implicit" in row_format), min_size=1, max_size=4))
    tools_form = draw(st.sampled_from(["none", "list", "list", "json"]))
    kwargs_forms = ["none", "every row", "every row"] + (["some rows"] if "conversational" in row_format else [])
    kwargs_form = draw(st.sampled_from(kwargs_forms))
    for index, row in enumerate(rows):
        row["row_index"] = index  # tells which rows TRL kept; an ignored column for pytest-dpo
        row["source"] = draw(text)
        if tools_form != "none":
            row["tools"] = draw(tools_cell(tools_form))
        if kwargs_form == "every row" or (kwargs_form == "some rows" and draw(st.booleans())):
            row["chat_template_kwargs"] = draw(kwargs_cell)
    return row_format, rows


# --------------------------------------------------------------------------------------------
# The two sides
# --------------------------------------------------------------------------------------------


def trl_tokenize(path: Path, tokenizer: Any, max_length: int | None, truncation_mode: str, cache: Path) -> dict[int, tuple]:
    """TRL's tokenized rows by `row_index`: the file through `datasets` and `DPOTrainer._prepare_dataset`."""
    from trl import DPOConfig, DPOTrainer

    dataset = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache))
    config = DPOConfig(
        output_dir=str(cache / "out"), max_length=max_length, truncation_mode=truncation_mode,
        use_cpu=True, bf16=False, report_to=[],
    )  # fmt: skip
    trainer = SimpleNamespace(_tokenizer=tokenizer)  # the one attribute `_prepare_dataset` reads from the trainer
    prepared = DPOTrainer._prepare_dataset(trainer, dataset, tokenizer, config, "eval")
    return {row["row_index"]: (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) for row in prepared}


def ours(path: Path, tokenizer: Any, max_length: int | None, truncation_mode: str) -> tuple[dict[int, tuple], list[int]]:
    tokenized = tokenize_eval_set(load_eval_set(path), tokenizer, max_length, truncation_mode)
    kept = {row.row: (row.prompt_ids, row.chosen_ids, row.rejected_ids) for row in tokenized.rows}
    return kept, tokenized.dropped_rows


@pytest.mark.parametrize("tokenizer_name", ["fixture", "qwen_style"])
@settings(max_examples=40, deadline=None)
@given(
    eval_file=eval_files(),
    max_length=st.one_of(st.none(), st.integers(4, 60)),
    truncation_mode=st.sampled_from(["keep_start", "keep_end"]),
)
def test_tokenization_matches_trl_prepare_dataset(
    tokenizers: dict[str, Any],
    tokenizer_name: str,
    eval_file: tuple[str, list[dict[str, Any]]],
    max_length: int | None,
    truncation_mode: str,
) -> None:
    tokenizer = tokenizers[tokenizer_name]
    _, rows = eval_file
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "eval.jsonl"
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        try:
            expected = trl_tokenize(path, tokenizer, max_length, truncation_mode, Path(folder))
        except TypeError as trl_error:  # `**None` for a row without chat_template_kwargs: refuse, do not score
            assert "not a mapping" in str(trl_error)
            with pytest.raises(EvalSetError, match="'chat_template_kwargs' is missing or null"):
                load_eval_set(path)
            return
        kept, dropped = ours(path, tokenizer, max_length, truncation_mode)
    assert kept == expected
    assert dropped == sorted(set(range(len(rows))) - set(expected))


def test_the_generated_files_cover_what_matters(tokenizers: dict[str, Any]) -> None:
    """The qwen-style tokenizer really renders tools, number types, key order and enable_thinking."""
    tokenizer = tokenizers["qwen_style"]
    prompt = [{"role": "user", "content": "hi"}]

    def render(**kwargs: Any) -> str:
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **kwargs)

    tools = [{"type": "function", "function": {"name": "f"}}]
    assert render(tools=tools) != render()
    assert render(tools=tools) != render(tools=[{"function": {"name": "f"}, "type": "function"}])
    assert render(budget=1) != render(budget=1.0)
    assert render(enable_thinking=False) != render(enable_thinking=True) == render()


def conversation(user: str, chosen: str, rejected: str, **columns: Any) -> dict[str, Any]:
    return {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": user}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        **columns,
    }


WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
DATASETS_QUIRKS = {
    # Arrow types objects with one key set as a struct: every row comes back in the first row's key order.
    "tools key order": [
        conversation("a", "b", "c", tools=[{"type": "function", "function": WEATHER}]),
        conversation("d", "e", "f", tools=[{"function": dict(reversed(list(WEATHER.items()))), "type": "function"}]),
    ],
    # ... and integers in a column that also holds floats come back as floats.
    "int and float": [
        conversation("a", "b", "c", chat_template_kwargs={"budget": 1}),
        conversation("d", "e", "f", chat_template_kwargs={"budget": 0.5}),
    ],
    # Objects whose key sets differ are kept as written (a JSON column), key order included.
    "different key sets": [
        conversation("a", "b", "c", chat_template_kwargs={"budget": 1, "enable_thinking": False}),
        conversation("d", "e", "f", chat_template_kwargs={"enable_thinking": True}),
        conversation("g", "h", "i", chat_template_kwargs={}),
    ],
    # Tools as lists in some rows and JSON strings in others: a JSON column, every row as written.
    "list and text tools": [
        conversation("a", "b", "c", tools=[{"type": "function", "function": WEATHER}]),
        conversation("d", "e", "f", tools=json.dumps([{"function": WEATHER, "type": "function"}])),
        conversation("g", "h", "i"),
    ],
}


@pytest.mark.parametrize("quirk", sorted(DATASETS_QUIRKS))
def test_datasets_json_quirks_match_trl(tokenizers: dict[str, Any], tmp_path: Path, quirk: str) -> None:
    rows = [{**row, "row_index": index} for index, row in enumerate(DATASETS_QUIRKS[quirk])]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    tokenizer = tokenizers["qwen_style"]
    kept, dropped = ours(path, tokenizer, None, "keep_start")
    assert kept == trl_tokenize(path, tokenizer, None, "keep_start", tmp_path)
    assert dropped == []
