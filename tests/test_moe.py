"""Mixture-of-experts policies: TRL's load-balancing `aux_loss`, and its weighted term in `loss`.

The aux loss is computed once from router sums over the whole eval set, which is TRL's value when its eval
batch is the whole set (as `trl_evaluate` runs it), and so does not depend on batch size or prompt sharing.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from pytest_dpo import evaluate, load_eval_set
from pytest_dpo.cache import CACHE_FORMAT, ScoreCache
from pytest_dpo.distributed import reassemble
from pytest_dpo.gates import GateError, parse_gate
from pytest_dpo.metrics import load_balancing_loss, router_aux_loss
from pytest_dpo.metric_table import METRIC_NAMES, MOE_METRICS
from pytest_dpo.moe import RouterSetup, routing_sums
from pytest_dpo.report_terminal import metrics_table
from pytest_dpo.results import ROUTER_FIELDS, SequenceScores
from pytest_dpo.scoring import score
from pytest_dpo.settings import SettingsError
from pytest_dpo.tokenization import tokenize_eval_set

from .fixture_paths import BASE, EVAL_CONVERSATIONAL, EVAL_STANDARD, FULL_RUN, MOE_BASE, MOE_RUN
from .test_parity import assert_same_numbers
from .trl_reference import trl_evaluate

# The coefficients fixtures/build.py gives the MoE base's config and its DPO run.
CONFIG_COEF = 0.02
RUN_COEF = 0.05
CHECKPOINT = MOE_RUN / "checkpoint-6"
DENSE_METRICS = [name for name in METRIC_NAMES if name not in MOE_METRICS]


# --- the accumulation --------------------------------------------------------------------------------------------


@st.composite
def routed_batches(draw: st.DrawFn) -> tuple[list[torch.Tensor], torch.Tensor, RouterSetup]:
    """Router logits of a right-padded batch (one tensor per MoE layer) with its attention mask."""
    num_experts = draw(st.integers(2, 8))
    setup = RouterSetup(num_experts, top_k=draw(st.integers(1, num_experts)))
    lengths = draw(st.lists(st.integers(1, 12), min_size=1, max_size=8))
    width = max(lengths) + draw(st.integers(0, 3))
    attention = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        attention[row, :length] = 1
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    scale = draw(st.floats(0.1, 8.0))
    layers = [
        scale * torch.randn(len(lengths) * width, num_experts, generator=generator)
        for _ in range(draw(st.integers(1, 3)))
    ]
    return layers, attention, setup


def _sub_batch(layers: list[torch.Tensor], attention: torch.Tensor, rows: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The rows' router logits and mask as a batch of their own, padded only to its longest row."""
    width = int(attention[rows].sum(dim=1).max())
    full_width = attention.shape[1]
    index = torch.tensor([row * full_width + position for row in rows for position in range(width)])
    return [layer[index] for layer in layers], attention[rows, :width]


@settings(max_examples=150, deadline=None)
@given(batch=routed_batches(), data=st.data())
def test_summed_router_sums_of_any_split_give_transformers_whole_batch_loss(
    batch: tuple[list[torch.Tensor], torch.Tensor, RouterSetup], data: st.DataObject
) -> None:
    layers, attention, setup = batch
    rows = data.draw(st.permutations(range(len(attention))))
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(rows) - 1)), max_size=len(rows) - 1)))
    parts = [rows[start:end] for start, end in zip([0, *cuts], [*cuts, len(rows)])]
    part_sums = [routing_sums(*_sub_batch(layers, attention, part), setup) for part in parts]
    totals = [torch.cat([sums[name] for sums in part_sums]) for name in ROUTER_FIELDS]
    expected = load_balancing_loss_func(tuple(layers), setup.num_experts, setup.top_k, attention).item()
    assert math.isclose(load_balancing_loss(*totals), expected, rel_tol=1e-5, abs_tol=1e-6)


def test_a_row_s_router_sums_do_not_depend_on_its_batch_or_padding() -> None:
    generator = torch.Generator().manual_seed(0)
    setup = RouterSetup(num_experts=4, top_k=2)
    attention = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    layers = [torch.randn(8, 4, generator=generator) for _ in range(2)]
    together = routing_sums(layers, attention, setup)
    alone = routing_sums(*_sub_batch(layers, attention, [0]), setup)
    assert torch.equal(together["router_expert_counts"][0], alone["router_expert_counts"][0])
    assert torch.allclose(together["router_prob_sums"][0], alone["router_prob_sums"][0])
    assert together["router_tokens"].tolist() == [6, 8]
    # Each real token picks top_k experts in each layer.
    assert together["router_expert_counts"].sum(dim=1).tolist() == [12, 16]


# --- storage -----------------------------------------------------------------------------------------------------


def _moe_scores(rows: int, num_experts: int = 4) -> SequenceScores:
    """Scores whose every row differs, router sums included, in the dtypes `scoring.score` gives them."""
    columns = {
        column.name: torch.arange(offset, offset + rows).to(
            torch.int64 if column.name.endswith(("tokens", "top1")) else torch.float32
        )
        for offset, column in enumerate(dataclasses.fields(SequenceScores))
    }
    return SequenceScores(
        **columns
        | {
            "router_expert_counts": torch.arange(rows * num_experts, dtype=torch.int64).view(rows, num_experts),
            "router_prob_sums": torch.rand(rows, num_experts, dtype=torch.float64),
        }
    )


def test_router_sums_survive_the_disk_cache(tmp_path: Path) -> None:
    scores = _moe_scores(5)
    ScoreCache(tmp_path).put("moe", scores)
    dense = dataclasses.replace(scores, **dict.fromkeys(ROUTER_FIELDS))
    ScoreCache(tmp_path).put("dense", dense)
    cache = ScoreCache(tmp_path)
    read = cache.get("moe", 5)
    assert read is not None
    for name in ROUTER_FIELDS:
        assert torch.equal(getattr(read, name), getattr(scores, name)), name
        assert getattr(read, name).dtype == getattr(scores, name).dtype, name
    read_dense = cache.get("dense", 5)
    assert read_dense is not None and all(getattr(read_dense, name) is None for name in ROUTER_FIELDS)


def test_an_entry_with_some_router_sums_missing_is_rebuilt(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    ScoreCache(tmp_path).put("moe", _moe_scores(3))
    [entry] = tmp_path.glob("*.safetensors")
    tensors = load_file(entry)
    del tensors["router_tokens"]
    save_file(tensors, entry, metadata={"format": str(CACHE_FORMAT)})
    cache = ScoreCache(tmp_path)
    assert cache.get("moe", 3) is None
    assert cache.stats.rebuilt == 1


def test_shards_reassemble_with_their_router_sums() -> None:
    whole = _moe_scores(5)
    shards = [[0, 3], [1, 2, 4]]
    taken = [
        (positions, SequenceScores(**{name: value[positions] for name, value in vars(whole).items()}))
        for positions in shards
    ]
    merged = reassemble(taken, 5)
    for name in ROUTER_FIELDS:
        assert torch.equal(getattr(merged, name), getattr(whole, name)), name


# --- settings, gates and reports --------------------------------------------------------------------------------


def test_aux_loss_gates_parse_but_have_no_confidence_interval() -> None:
    assert parse_gate("eval_aux_loss <= 2.5", "dpo_gates line 1").metric == "aux_loss"
    with pytest.raises(GateError, match="aux_loss is one value over the eval set"):
        parse_gate("aux_loss <= 2.5 @95%", "dpo_gates line 1")


def test_the_metrics_table_shows_aux_loss_only_where_a_checkpoint_has_it() -> None:
    dense_metrics = dict.fromkeys(DENSE_METRICS, 0.5)
    dense = SimpleNamespace(checkpoint="dense", metrics=dense_metrics, num_examples=3, dropped_rows=[])
    moe = SimpleNamespace(checkpoint="moe", metrics={**dense_metrics, "aux_loss": 1.99}, num_examples=3, dropped_rows=[])
    assert "aux_loss" not in metrics_table([dense])
    [aux_line] = [line for line in metrics_table([dense, moe]).splitlines() if line.startswith("aux_loss")]
    assert aux_line.split() == ["aux_loss", "-", "1.9900"]


def test_a_coefficient_for_a_model_without_router_logits_is_refused() -> None:
    with pytest.raises(SettingsError, match="not a mixture-of-experts model") as refused:
        evaluate(FULL_RUN / "checkpoint-4", EVAL_STANDARD, reference=BASE, router_aux_loss_coef=0.01, device="cpu")
    assert refused.value.field == "router_aux_loss_coef"


@pytest.mark.slow
def test_the_coefficient_comes_from_the_run_the_setting_or_the_config(tmp_path: Path) -> None:
    def run(**settings: Any) -> dict[str, float]:
        return evaluate(CHECKPOINT, EVAL_STANDARD, reference=MOE_BASE, device="cpu", cache_dir=tmp_path, **settings).metrics

    from_run, from_config, left_out = run(), run(router_aux_loss_coef=None), run(router_aux_loss_coef=0.0)
    assert "aux_loss" not in left_out
    aux_loss = from_run["aux_loss"]
    assert from_config["aux_loss"] == aux_loss
    # The per-example losses are float32, like TRL's.
    assert math.isclose(from_run["loss"], left_out["loss"] + RUN_COEF * aux_loss, rel_tol=1e-6)
    assert math.isclose(from_config["loss"], left_out["loss"] + CONFIG_COEF * aux_loss, rel_tol=1e-6)


# --- against TRL, and across batchings ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("eval_file", "max_length", "trl_coef", "ours"),
    [
        # Ours reads the run's coefficient from its training_args.bin.
        pytest.param(EVAL_STANDARD, 48, RUN_COEF, {}, id="standard-truncated-run-coef"),
        pytest.param(EVAL_CONVERSATIONAL, 1024, None, {"router_aux_loss_coef": None}, id="conversational-config-coef"),
    ],
)
def test_moe_run_matches_trl(
    tmp_path: Path, eval_file: Path, max_length: int, trl_coef: float | None, ours: dict[str, Any]
) -> None:
    rows = load_eval_set(eval_file).rows
    trl = trl_evaluate(CHECKPOINT, MOE_BASE, rows, tmp_path, max_length=max_length, router_aux_loss_coef=trl_coef)
    result = evaluate(CHECKPOINT, eval_file, reference=MOE_BASE, max_length=max_length, device="cpu", **ours)
    assert "aux_loss" in trl.metrics
    assert_same_numbers(result, trl)


@pytest.mark.slow
def test_aux_loss_does_not_depend_on_batch_size_or_prompt_sharing() -> None:
    model = AutoModelForCausalLM.from_pretrained(CHECKPOINT, dtype=torch.float32)
    tokenized = tokenize_eval_set(load_eval_set(EVAL_STANDARD), AutoTokenizer.from_pretrained(CHECKPOINT), 48, "keep_start")
    aux_losses = [
        router_aux_loss(score(model, tokenized, batch_size=size, max_length=48, truncation_mode="keep_start", share_prompt=share))
        for size in (1, 3, 8)
        for share in (True, False)
    ]
    assert all(math.isclose(value, aux_losses[0], rel_tol=1e-6) for value in aux_losses), aux_losses
