"""Benchmark: pytest-dpo's checkpoint sweep against TRL 1.16 `DPOTrainer.evaluate()` and bare forward passes.

    python benchmarks/bench_evaluate.py [--checkpoints 4] [--rows 256] [--workdir DIR] [--quick]

One run builds (or reuses) a small TRL-style run in the workdir (a random-init
Qwen2 base model, K perturbed `checkpoint-N` folders, an eval set of N
standard preference rows), then measures with the same settings (beta 0.1,
sigmoid, max_length 1024, fp32, CPU, batch size 8):

  a. TRL `DPOTrainer.evaluate()` per checkpoint, the base as explicit `ref_model`;
  b. pytest-dpo cold: `CheckpointEvaluation.score` over the K checkpoints with a fresh on-disk score cache;
  c. pytest-dpo warm: the same again on the same cache dir;
  d. the bare lower bound: K+1 models loaded and run over length-sorted batches, nothing else;
  e. the largest logits tensor pytest-dpo materialises against the full B x T x V logits;
  f. the plugin's import overhead on `pytest --co`;
  g. parity of pytest-dpo's numbers with TRL's (metrics and per-example log-probs).

It prints a table with the targets and writes the same numbers as JSON into the workdir.
"""

from __future__ import annotations

import os

# Before transformers / datasets / tokenizers are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pytest_dpo import evaluation, scoring  # noqa: E402
from pytest_dpo.cache import ScoreCache  # noqa: E402
from pytest_dpo.evalset import load_eval_set  # noqa: E402
from pytest_dpo.metrics import aggregate  # noqa: E402
from pytest_dpo.metric_table import METRIC_NAMES, MOE_METRICS  # noqa: E402
from pytest_dpo.checkpoints import Checkpoint, discover_checkpoints  # noqa: E402
from pytest_dpo.loading import load_causal_lm  # noqa: E402
from pytest_dpo.results import EvalResult, PerExample  # noqa: E402
from pytest_dpo.settings import DPOSettings  # noqa: E402
from pytest_dpo.tokenization import TokenizedEvalSet, tokenize_eval_set  # noqa: E402

FIXTURES = REPO_ROOT / "fixtures"
TOKENIZER_DIR = FIXTURES / "tokenizer"
DEFAULT_WORKDIR = Path(__file__).resolve().parent / ".work"

SETTINGS = DPOSettings(beta=0.1, loss_type="sigmoid", max_length=1024, batch_size=8, device="cpu", dtype="float32")
# A ~5M-parameter Qwen2 with Qwen2's real vocabulary: as in TRL's tiny test models, the LM head holds almost all
# the weights, so how much of B x T x V each contestant computes decides its time.
MODEL_SHAPE = {
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 64,
}
QWEN2_VOCAB = 151_936
SEQUENCE_TOKENS = (30, 150)  # prompt + completion (BOS and EOS included) of every sequence
CHECKPOINT_NOISE = 0.05  # checkpoint k = base + k * CHECKPOINT_NOISE * std(param) * noise
DATA_SEED = 0
IMPORT_RUNS = 5
# Other processes on a 2-core machine slow torch's threads down many times over; above this, say so.
BUSY_CORES = 0.25
# fp32 rounding, not disagreement: sequence log-probs of a few hundred nats agree to ~1e-6 relative, so rewards
# (beta x differences of them) and their means agree to ~1e-5 absolute; metrics are compared relatively above 1.
PARITY_RELATIVE = 1e-5
PARITY_ABSOLUTE = 1e-5
# A reward margin this close to 0 is within fp32 rounding of the log-probs: its accuracy decision is a coin flip.
TIE_MARGIN = 1e-4
# The benchmark's model is dense: TRL reports no MoE metric for it.
DENSE_METRICS = tuple(name for name in METRIC_NAMES if name not in MOE_METRICS)
CONTINUOUS_METRICS = tuple(name for name in DENSE_METRICS if name != "rewards/accuracies")
# Completion tokens per LM-head matmul in the bare lower bound: a 0.6 GB fp32 tile with Qwen2's vocab.
BARE_HEAD_TOKENS = 1024
RSS_INTERVAL_S = 0.01

TARGETS = {
    "cold/TRL": 0.25,
    "cold/bare": 1.3,
    "warm/TRL": 0.05,
    "logits peak ratio": 1 / 8,
    "import overhead ms": 50.0,
}


# --------------------------------------------------------------------------------------------------------------------
# Setup: the TRL-style run and the eval set
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    base: Path
    checkpoints: list[Path]
    eval_file: Path
    parameters: int
    vocab_size: int


def build_workload(workdir: Path, checkpoints: int, rows: int, vocab_size: int | None) -> Workload:
    """The base model, K checkpoints and the eval set, each reused when already in `workdir` with the same shape."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    # Next to a Qwen2 config, transformers loads it as a Qwen2Tokenizer, which would add a pad token beyond the
    # model's vocab; with pad = EOS (what TRL does anyway) it keeps its 512 tokens.
    tokenizer.pad_token = tokenizer.eos_token
    vocab = vocab_size or QWEN2_VOCAB
    base = workdir / "base"
    manifest = {
        "shape": MODEL_SHAPE,
        "vocab_size": vocab,
        "noise": CHECKPOINT_NOISE,
        "sequence_tokens": SEQUENCE_TOKENS,
        "seed": DATA_SEED,
        "format": 2,
    }
    fresh = _read_json(workdir / "manifest.json") != json.loads(json.dumps(manifest))
    if fresh or not (base / "model.safetensors").exists():
        shutil.rmtree(workdir / "run", ignore_errors=True)
        for stale in workdir.glob("eval_*.jsonl"):
            stale.unlink()
        save_model(new_base_model(tokenizer, vocab), tokenizer, base)
        (workdir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    paths = [ensure_checkpoint(base, tokenizer, workdir / "run" / f"checkpoint-{k}", k) for k in range(1, checkpoints + 1)]
    eval_file = workdir / f"eval_{rows}.jsonl"
    if not eval_file.exists():
        # Lengths are counted with the tokenizer both contestants load from the checkpoint folders.
        write_jsonl(eval_file, make_eval_rows(rows, AutoTokenizer.from_pretrained(str(base))))
    parameters = sum(p.numel() for p in load_causal_lm(str(base), device="cpu", dtype=torch.float32).parameters())
    return Workload(base, paths, eval_file, parameters, vocab)


def new_base_model(tokenizer: Any, vocab_size: int, shape: dict[str, int] = MODEL_SHAPE) -> torch.nn.Module:
    """A seeded random-init Qwen2 of `shape` (hidden size, layers, heads, ...) with `vocab_size` tokens."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        **shape,
    )
    torch.manual_seed(DATA_SEED)
    return Qwen2ForCausalLM(config).eval()


def ensure_checkpoint(base: Path, tokenizer: Any, folder: Path, k: int) -> Path:
    """`checkpoint-k`: the base with seeded noise that grows with k, standing in for k training steps."""
    if (folder / "model.safetensors").exists():
        return folder
    model = load_causal_lm(str(base), device="cpu", dtype=torch.float32)
    generator = torch.Generator().manual_seed(1000 + k)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(noise * parameter.float().std().nan_to_num(0.0) * (k * CHECKPOINT_NOISE))
    save_model(model, tokenizer, folder)
    return folder


def save_model(model: torch.nn.Module, tokenizer: Any, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))


def source_triples() -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) as plain text from every fixture eval/train file, whatever its format."""
    triples = []
    for path in sorted((FIXTURES / "data").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                triples.append(_as_text(json.loads(line)))
    return triples


def _as_text(row: dict[str, Any]) -> tuple[str, str, str]:
    if "prompt" in row:
        return _render(row["prompt"]), _completion(row["chosen"]), _completion(row["rejected"])
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, list):  # implicit conversational: the last message is the completion
        return _render(chosen[:-1]), _completion(chosen[-1:]), _completion(rejected[-1:])
    cut = chosen.rindex("A:") + 2  # implicit standard: "Q: ...\nA:" is the shared prompt
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _render(prompt: str | list[dict[str, str]]) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{message['role']}: {message['content']}" for message in prompt) + "\nassistant:"


def _completion(completion: str | list[dict[str, str]]) -> str:
    return completion if isinstance(completion, str) else " " + " ".join(m["content"] for m in completion)


def make_eval_rows(count: int, tokenizer: Any) -> list[dict[str, str]]:
    """`count` standard rows from the fixture rows: few-shot context before the prompt, longer completions.

    Each row's prompt + chosen (BOS and EOS included) gets a target length
    drawn from SEQUENCE_TOKENS, the prompt 20-60% of it; prompt + rejected
    gets a length near that one.
    """
    rng, triples, sentences, shots, length = _growing(tokenizer)
    rows = []
    for _ in range(count):
        prompt, chosen, rejected = rng.choice(triples)
        low, high = SEQUENCE_TOKENS
        total = rng.randint(low, high)
        prompt = _grow(prompt, shots, int(total * rng.uniform(0.2, 0.6)), rng, length, before=True)
        shortest = min(high, max(low, length(prompt) + 4))
        rejected_total = rng.randint(total // 2, total + 20)
        rows.append(
            {
                "prompt": prompt,
                "chosen": _grow(chosen, sentences, _clamp(total, shortest, high), rng, length, before=False, start=prompt),
                "rejected": _grow(
                    rejected, sentences, _clamp(rejected_total, shortest, high), rng, length, before=False, start=prompt
                ),
            }
        )
    return rows


def _growing(tokenizer: Any) -> tuple[random.Random, list[tuple[str, str, str]], list[str], list[str], Any]:
    """What eval rows are grown from: a seeded rng, the fixture rows, their sentences, their few-shot texts, and a
    token counter."""
    triples = source_triples()
    sentences = [text.strip() for _, chosen, rejected in triples for text in (chosen, rejected) if text.strip()]
    shots = [f"{prompt}{chosen}" for prompt, chosen, _ in triples]
    return random.Random(DATA_SEED), triples, sentences, shots, functools.partial(_token_count, tokenizer)


def rows_of_lengths(
    count: int, tokenizer: Any, prompt_tokens: tuple[int, int], completion_tokens: tuple[int, int]
) -> list[dict[str, str]]:
    """`count` standard rows grown from the fixture rows: a prompt of `prompt_tokens` (few-shot context before the
    question), each completion `completion_tokens` after it (EOS included), lengths drawn per row with a fixed seed."""
    rng, triples, sentences, shots, length = _growing(tokenizer)
    rows = []
    for _ in range(count):
        prompt, chosen, rejected = rng.choice(triples)
        prompt = _grow(prompt, shots, rng.randint(*prompt_tokens), rng, length, before=True)
        prompt_length = length(prompt)
        row = {"prompt": prompt}
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            target = prompt_length + rng.randint(*completion_tokens)
            row[side] = _grow(text, sentences, target, rng, length, before=False, start=prompt)
        rows.append(row)
    return rows


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def _token_count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def _grow(
    text: str,
    pieces: list[str],
    target: int,
    rng: random.Random,
    length: Callable[[str], int],
    *,
    before: bool,
    start: str = "",
) -> str:
    """Add random pieces before (few-shot context) or after (longer answers) `text` until `start + text` has
    about `target` tokens (+1 for the EOS TRL appends to completions), then trim words back under it."""
    eos = 0 if before else 1
    grown = text
    while length(start + grown) + eos < target:
        piece = rng.choice(pieces)
        grown = f"{piece}\n\n{grown}" if before else f"{grown} {piece}"
    while length(start + grown) + eos > target and len(grown) > len(text):
        grown = grown.split(" ", 1)[1] if before else grown.rsplit(" ", 1)[0]
    return grown


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def tokenized_workload(workload: Workload) -> TokenizedEvalSet:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(workload.base))
    return tokenize_eval_set(load_eval_set(workload.eval_file), tokenizer, SETTINGS.max_length, SETTINGS.truncation_mode)


def sequence_pairs(tokenized: TokenizedEvalSet) -> list[tuple[list[int], ...]]:
    """Each row's (chosen ids, chosen mask, rejected ids, rejected mask), truncated as both contestants do."""
    return [scoring.sequence_pair(row, SETTINGS.max_length, SETTINGS.truncation_mode) for row in tokenized.rows]


def sequence_lengths(tokenized: TokenizedEvalSet) -> list[int]:
    return [len(ids) for pair in sequence_pairs(tokenized) for ids in (pair[0], pair[2])]


def padded_tokens(tokenized: TokenizedEvalSet, *, sort: bool) -> int:
    """Token positions a model runs over with batches of `batch_size` rows padded to their longest sequence:
    in eval-set order (TRL's eval loader) or sorted by length (pytest-dpo, the bare loop)."""
    lengths = sequence_lengths(tokenized)
    longest = [max(lengths[2 * i], lengths[2 * i + 1]) for i in range(len(lengths) // 2)]
    if sort:
        longest.sort(reverse=True)
    size = SETTINGS.batch_size
    return sum(2 * len(longest[i : i + size]) * max(longest[i : i + size]) for i in range(0, len(longest), size))


# --------------------------------------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def stopwatch(into: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        into[key] = into.get(key, 0.0) + time.perf_counter() - start


@contextlib.contextmanager
def patched(target: Any, name: str, replacement: Any) -> Iterator[None]:
    original = getattr(target, name)
    setattr(target, name, replacement)
    try:
        yield
    finally:
        setattr(target, name, original)


def timed_function(function: Callable[..., Any], into: dict[str, float], key: str) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with stopwatch(into, key):
            return function(*args, **kwargs)

    return wrapper


# What CheckpointEvaluation calls, by the name it looks up in pytest_dpo.evaluation at call time.
BREAKDOWN_FUNCTIONS = (
    "resolve_reference",
    "load_tokenizer",
    "check_tokenizer",
    "tokenize_eval_set",
    "tokens_digest",
    "policy_fingerprint",
    "reference_fingerprint",
    "load_policy",
    "load_reference",
    "score",
    "build_per_example",
    "aggregate",
    "free_memory",
)


@contextlib.contextmanager
def breakdown(into: dict[str, float]) -> Iterator[None]:
    """Time every step of `CheckpointEvaluation.score` (wrappers cost microseconds against seconds of work)."""
    with contextlib.ExitStack() as stack:
        for name in BREAKDOWN_FUNCTIONS:
            wrapper = timed_function(getattr(evaluation, name), into, name)
            stack.enter_context(patched(evaluation, name, wrapper))
        for method in ("get", "put"):
            wrapper = timed_function(getattr(ScoreCache, method), into, f"cache.{method}")
            stack.enter_context(patched(ScoreCache, method, wrapper))
        yield


# --------------------------------------------------------------------------------------------------------------------
# a. TRL
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class TrlCheckpoint:
    name: str
    construct_s: float
    evaluate_s: float
    metrics: dict[str, float]
    logps: dict[str, torch.Tensor]

    @property
    def total_s(self) -> float:
        return self.construct_s + self.evaluate_s


def trl_config_kwargs() -> dict[str, Any]:
    """`DPOConfig`'s arguments besides `output_dir`: SETTINGS as TRL spells them, fp32 on CPU, no logging."""
    return {
        "per_device_eval_batch_size": SETTINGS.batch_size,
        "beta": SETTINGS.beta,
        "loss_type": list(SETTINGS.loss_type),
        "max_length": SETTINGS.max_length,
        "report_to": [],
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }


def trl_checkpoint(checkpoint: Path, workload: Workload, rows: list[dict[str, Any]], output_dir: Path) -> TrlCheckpoint:
    """What a user pays for one checkpoint with TRL: load both models, build the trainer, evaluate()."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    times: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()), stopwatch(times, "construct"):
        model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
        ref_model = AutoModelForCausalLM.from_pretrained(str(workload.base), dtype=torch.float32)
        config = DPOConfig(output_dir=str(output_dir), **trl_config_kwargs())
        trainer = DPOTrainer(
            model=model,
            ref_model=ref_model,
            args=config,
            # TRL requires a train set; one row keeps its tokenization out of the way.
            train_dataset=Dataset.from_list(rows[:1]),
            eval_dataset=Dataset.from_list(rows),
            processing_class=AutoTokenizer.from_pretrained(str(checkpoint)),
        )
    with contextlib.redirect_stdout(io.StringIO()), stopwatch(times, "evaluate"):
        metrics = trainer.evaluate()
    return TrlCheckpoint(
        name=checkpoint.name,
        construct_s=times["construct"],
        evaluate_s=times["evaluate"],
        metrics={name: float(metrics[f"eval_{name}"]) for name in DENSE_METRICS},
        logps=trl_per_example_logps(trainer),
    )


def trl_per_example_logps(trainer: Any) -> dict[str, torch.Tensor]:
    """TRL's own per-example log-probs (untimed), through `compute_ref_log_probs` as tests/trl_reference.py does."""
    prepared = trainer.eval_dataset
    keys = ("policy_chosen", "policy_rejected", "reference_chosen", "reference_rejected")
    out: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
    trainer.model.eval()
    for start in range(0, len(prepared), SETTINGS.batch_size):
        batch = trainer.data_collator([prepared[i] for i in range(start, min(start + SETTINGS.batch_size, len(prepared)))])
        for role, model in (("policy", trainer.model), ("reference", trainer.ref_model)):
            chosen, rejected = trainer.compute_ref_log_probs(model, batch)
            out[f"{role}_chosen"].append(chosen.cpu())
            out[f"{role}_rejected"].append(rejected.cpu())
    return {key: torch.cat(parts) for key, parts in out.items()}


def run_trl(workload: Workload, scratch: Path) -> tuple[list[TrlCheckpoint], float]:
    """Every checkpoint through TRL, and the peak resident memory it added (MiB)."""
    rows = [json.loads(line) for line in workload.eval_file.read_text(encoding="utf-8").splitlines()]
    with peak_rss() as memory:
        checkpoints = [trl_checkpoint(path, workload, rows, scratch / "trl" / path.name) for path in workload.checkpoints]
    return checkpoints, memory["peak_mib"]


# --------------------------------------------------------------------------------------------------------------------
# b, c. pytest-dpo
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class DpoRun:
    total_s: float
    per_checkpoint_s: dict[str, float]
    results: dict[str, EvalResult]
    cache_hits: int
    cache_misses: int
    peak_rss_mib: float
    breakdown_s: dict[str, float] = field(default_factory=dict)


def run_pytest_dpo(workload: Workload, cache_dir: Path) -> DpoRun:
    """A sweep as the plugin's session runs it: the eval set loaded once, one score cache shared by all checkpoints."""
    steps: dict[str, float] = {}
    per_checkpoint: dict[str, float] = {}
    results: dict[str, EvalResult] = {}
    start = time.perf_counter()
    with breakdown(steps), peak_rss() as memory:
        with stopwatch(steps, "load_eval_set + discover"):
            eval_set = load_eval_set(workload.eval_file)
            checkpoints = sweep_checkpoints(workload)
        cache = ScoreCache(cache_dir)
        for checkpoint in checkpoints:
            with stopwatch(per_checkpoint, checkpoint.name):
                results[checkpoint.name] = evaluation.CheckpointEvaluation(
                    checkpoint, eval_set, str(workload.base), SETTINGS, cache
                ).score()
    total = time.perf_counter() - start
    return DpoRun(total, per_checkpoint, results, cache.stats.hits, cache.stats.misses, memory["peak_mib"], steps)


def sweep_checkpoints(workload: Workload) -> list[Checkpoint]:
    wanted = {path.resolve() for path in workload.checkpoints}
    run_dir = workload.checkpoints[0].parent
    return [checkpoint for checkpoint in discover_checkpoints(run_dir) if checkpoint.path.resolve() in wanted]


# --------------------------------------------------------------------------------------------------------------------
# d. Bare lower bound
# --------------------------------------------------------------------------------------------------------------------


def sorted_batches(tokenized: TokenizedEvalSet) -> list[dict[str, torch.Tensor]]:
    """Each length-sorted batch's unique tokens, built before timing: the prompts once, then every row's chosen
    and rejected completion, as padded ids, masks and the positions the completions continue from."""
    batches = []
    for rows in scoring._batches_by_length(sequence_pairs(tokenized), SETTINGS.batch_size):
        batch = [tokenized.rows[i] for i in rows]
        prompt_ids, prompt_mask = scoring._right_padded([row.prompt_ids for row in batch], torch.device("cpu"))
        completions = [ids for row in batch for ids in (row.chosen_ids, row.rejected_ids)]
        completion_ids, completion_mask = scoring._right_padded(completions, torch.device("cpu"))
        prompt_lengths = prompt_mask.sum(dim=1)
        batches.append(
            {
                "prompt_ids": prompt_ids,
                "prompt_mask": prompt_mask,
                "completion_ids": completion_ids,
                "attention": torch.cat([prompt_mask.repeat_interleave(2, dim=0), completion_mask], dim=1),
                "positions": prompt_lengths.repeat_interleave(2).unsqueeze(1) + torch.arange(completion_ids.shape[1]),
                "last_prompt": prompt_lengths - 1,
                "completion_mask": completion_mask.bool(),
            }
        )
    return batches


def bare_log_probs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Completion-token log-probs of one batch, with nothing but the model's own modules: the prompts run once,
    the completions continue from their KV cache, the LM head runs on completion positions only."""
    prompt = model.model(input_ids=batch["prompt_ids"], attention_mask=batch["prompt_mask"], use_cache=True)
    cache = prompt.cache
    cache.batch_repeat_interleave(2)
    hidden = model.model(
        input_ids=batch["completion_ids"], attention_mask=batch["attention"], position_ids=batch["positions"],
        cache=cache, use_cache=True,
    ).last_hidden_state
    last = prompt.last_hidden_state[torch.arange(len(batch["last_prompt"])), batch["last_prompt"]]
    predicting = torch.cat([last.repeat_interleave(2, dim=0).unsqueeze(1), hidden[:, :-1]], dim=1)
    mask = batch["completion_mask"]
    token_hidden, targets = predicting[mask], batch["completion_ids"][mask]
    parts = []
    for start in range(0, len(targets), BARE_HEAD_TOKENS):
        logits = model.lm_head(token_hidden[start : start + BARE_HEAD_TOKENS])
        target = logits.gather(-1, targets[start : start + BARE_HEAD_TOKENS, None]).squeeze(-1)
        parts.append(target - torch.logsumexp(logits, dim=-1))
    return torch.cat(parts)


def run_bare(workload: Workload, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """K+1 models (the checkpoints and the reference), each loaded and run over the batches' unique tokens."""
    from transformers import AutoModelForCausalLM

    times: dict[str, float] = {}
    with peak_rss() as memory:
        for path in [workload.base, *workload.checkpoints]:
            with stopwatch(times, "load"):
                model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
            with stopwatch(times, "forward"), torch.inference_mode():
                for batch in batches:
                    bare_log_probs(model, batch)
            del model
    return {
        "load_s": times["load"],
        "forward_s": times["forward"],
        "total_s": times["load"] + times["forward"],
        "peak_rss_mib": memory["peak_mib"],
    }


# --------------------------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def peak_rss() -> Iterator[dict[str, float]]:
    """Within: the process's resident memory sampled every RSS_INTERVAL_S; `peak_mib` is its highest rise above
    the start (what the contestant itself allocated, as a maximum over time)."""
    import threading

    record = {"peak_mib": 0.0}
    start = _rss_bytes()
    highest = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(RSS_INTERVAL_S):
            highest[0] = max(highest[0], _rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield record
    finally:
        done.set()
        sampler.join()
        record["peak_mib"] = (max(highest[0], _rss_bytes()) - start) / 2**20


# --------------------------------------------------------------------------------------------------------------------
# e. Peak logits
# --------------------------------------------------------------------------------------------------------------------


class RecordingHead:
    """Stands in for the LM head inside `_completion_sums` and remembers the largest logits it returned."""

    def __init__(self, head: torch.nn.Module, record: dict[str, int]) -> None:
        self.head = head
        self.weight = head.weight
        self.record = record

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        self.record["peak_elements"] = max(self.record.get("peak_elements", 0), logits.numel())
        return logits


@contextlib.contextmanager
def recording_logits(record: dict[str, int]) -> Iterator[None]:
    """Within: every `_completion_sums` call records its batch's full logits size and its largest logits chunk."""
    original = scoring._completion_sums

    def recording_sums(
        hidden: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, shared_lengths: torch.Tensor, head: scoring.Head
    ) -> Any:
        full = hidden.shape[0] * (hidden.shape[1] + 1) * head.module.weight.shape[0]  # the model's logits cover every position
        record["full_elements"] = max(record.get("full_elements", 0), full)
        return original(hidden, labels, mask, shared_lengths, dataclasses.replace(head, module=RecordingHead(head.module, record)))

    with patched(scoring, "_completion_sums", recording_sums):
        yield


def measure_logits_peak(workload: Workload, tokenized: TokenizedEvalSet) -> dict[str, Any]:
    """Largest logits chunk pytest-dpo builds vs the fp32 B x T x V logits of its largest batch: scoring the eval
    set with the benchmark model, and the largest batch through a head of a realistic vocab."""
    record: dict[str, int] = {}
    model = load_causal_lm(str(workload.checkpoints[0]), device="cpu", dtype=torch.float32)
    with recording_logits(record):
        scoring.score(model, tokenized, batch_size=SETTINGS.batch_size, max_length=SETTINGS.max_length,
                      truncation_mode=SETTINGS.truncation_mode)
    return logits_summary(record, workload.vocab_size)


def logits_summary(record: dict[str, int], vocab: int) -> dict[str, Any]:
    peak, full = record["peak_elements"], record["full_elements"]
    return {
        "vocab": vocab,
        "chunk_tokens": peak // vocab,
        "peak_elements": peak,
        "full_elements": full,
        "peak_mib": peak * 4 / 2**20,
        "full_mib": full * 4 / 2**20,
        "ratio": peak / full,
    }


# --------------------------------------------------------------------------------------------------------------------
# f. Plugin import overhead
# --------------------------------------------------------------------------------------------------------------------


def measure_import_overhead(pycache: Path, runs: int = IMPORT_RUNS) -> dict[str, Any]:
    """`pytest --co` on a trivial test with the plugin vs `-p no:dpo`, interleaved so drift hits both alike.

    Bytecode is cached (under `pycache`, outside the source tree) as in a normal install, even where
    PYTHONDONTWRITEBYTECODE is set, so neither side pays for compiling modules on every run.
    """
    with tempfile.TemporaryDirectory(prefix="bench-dpo-import-") as folder:
        Path(folder, "test_trivial.py").write_text("def test_nothing():\n    assert True\n")
        skip = ("PYTEST_ADDOPTS", "PYTHONDONTWRITEBYTECODE")
        env = {key: value for key, value in os.environ.items() if key not in skip}
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
        base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--co", "-q"]
        commands = {"with_plugin": base, "without_plugin": [*base, "-p", "no:dpo"]}
        _check_plugin_switch(commands, folder, env)
        for command in commands.values():  # warm the file cache and bytecode first
            _run_seconds(command, folder, env)
        samples: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(runs):
            for name, command in commands.items():
                samples[name].append(_run_seconds(command, folder, env))
    medians = {name: statistics.median(values) * 1000 for name, values in samples.items()}
    return {
        "with_plugin_ms": medians["with_plugin"],
        "without_plugin_ms": medians["without_plugin"],
        "overhead_ms": medians["with_plugin"] - medians["without_plugin"],
        "samples_ms": {name: [v * 1000 for v in values] for name, values in samples.items()},
    }


def _check_plugin_switch(commands: dict[str, list[str]], cwd: str, env: dict[str, str]) -> None:
    """Make sure the two commands differ by the plugin: its options are there with it and gone without it."""
    for name, expected in (("with_plugin", True), ("without_plugin", False)):
        shown = subprocess.run([*commands[name], "--help"], cwd=cwd, env=env, capture_output=True, text=True).stdout
        if ("--dpo-checkpoint" in shown) != expected:
            raise RuntimeError(f"{name}: pytest-dpo is {'not ' if expected else ''}loaded; check the entry point 'dpo'.")


def _run_seconds(command: list[str], cwd: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------------------------------
# g. Parity
# --------------------------------------------------------------------------------------------------------------------


def trl_batch_metrics(p: PerExample, batch_size: int) -> dict[str, float]:
    """TRL's `evaluate()` numbers rebuilt from our per-example arrays: per-batch metrics (eval-set order, as TRL's
    sequential eval loader), then the mean of the batch means (the loss weighted by batch size, as Trainer does)."""
    batches = [slice(start, start + batch_size) for start in range(0, len(p), batch_size)]
    per_batch = [aggregate(_rows_of(p, part)) for part in batches]
    sizes = [len(p.rows[part]) for part in batches]
    metrics = {name: sum(m[name] for m in per_batch) / len(per_batch) for name in DENSE_METRICS}
    metrics["loss"] = sum(m["loss"] * n for m, n in zip(per_batch, sizes)) / sum(sizes)
    return metrics


def _rows_of(p: PerExample, part: slice) -> PerExample:
    return PerExample(**{column.name: getattr(p, column.name)[part] for column in dataclasses.fields(PerExample)})


def relative_difference(ours: float, theirs: float) -> float:
    return abs(ours - theirs) / max(abs(theirs), PARITY_ABSOLUTE / PARITY_RELATIVE)


def parity(trl: list[TrlCheckpoint], dpo: DpoRun) -> dict[str, Any]:
    """Largest disagreements over all checkpoints: replayed batch metrics, whole-set metrics, per-example logps,
    and rows whose chosen-vs-rejected decision differs (a margin within rounding of 0 can land on either side)."""
    replayed: list[tuple[float, str]] = []
    whole_set: list[tuple[float, str]] = []
    logps: list[tuple[float, float, str]] = []
    flips: list[float] = []
    accuracy: list[tuple[float, str]] = []
    for checkpoint in trl:
        result = dpo.results[checkpoint.name]
        batch_means = trl_batch_metrics(result.per_example, SETTINGS.batch_size)
        replayed += _metric_differences(batch_means, checkpoint, CONTINUOUS_METRICS)
        accuracy += _metric_differences(batch_means, checkpoint, ("rewards/accuracies",))
        whole_set += _metric_differences(result.metrics, checkpoint, DENSE_METRICS)
        logps += _logp_differences(result.per_example, checkpoint)
        flips += _decision_flips(result.per_example, checkpoint)
    worst_replayed, worst_whole, worst_logps = max(replayed), max(whole_set), max(logps)
    # An accuracy may differ only through rows whose margin is a rounding-level tie.
    accuracy_ok = max(accuracy)[0] <= PARITY_RELATIVE or (flips and max(flips) < TIE_MARGIN)
    return {
        "metrics_max_relative": worst_replayed[0],
        "metrics_worst": worst_replayed[1],
        "accuracy_max_difference": max(accuracy)[0],
        "accuracy_flipped_rows": len(flips),
        "accuracy_flipped_max_margin": max(flips, default=0.0),
        "match": worst_replayed[0] <= PARITY_RELATIVE
        and max(entry[1] for entry in logps) <= PARITY_RELATIVE
        and bool(accuracy_ok),
        "whole_set_max_relative": worst_whole[0],
        "whole_set_worst": worst_whole[1],
        "logps_max_abs": worst_logps[0],
        "logps_max_relative": max(entry[1] for entry in logps),
        "logps_worst": worst_logps[2],
        "tolerance": {"relative": PARITY_RELATIVE, "absolute": PARITY_ABSOLUTE, "tie_margin": TIE_MARGIN},
    }


def _metric_differences(ours: dict[str, float], trl: TrlCheckpoint, names: tuple[str, ...]) -> list[tuple[float, str]]:
    return [(relative_difference(ours[name], trl.metrics[name]), f"{trl.name} {name}") for name in names]


def _logp_differences(p: PerExample, trl: TrlCheckpoint) -> list[tuple[float, float, str]]:
    differences = []
    for key, theirs in trl.logps.items():
        difference = (getattr(p, f"{key}_logps") - theirs).abs()
        relative = (difference / theirs.abs().clamp(min=1e-6)).max().item()
        differences.append((difference.max().item(), relative, f"{trl.name} {key}"))
    return differences


def _decision_flips(p: PerExample, trl: TrlCheckpoint) -> list[float]:
    """|our margin| of each row where TRL's `chosen_rewards > rejected_rewards` (from its own logps) differs from ours."""
    beta = SETTINGS.beta
    theirs = beta * (trl.logps["policy_chosen"] - trl.logps["reference_chosen"]) > beta * (
        trl.logps["policy_rejected"] - trl.logps["reference_rejected"]
    )
    ours = p.chosen_rewards > p.rejected_rewards
    return p.margins[ours != theirs].abs().tolist()


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------


def summarise(
    workload: Workload,
    tokenized: TokenizedEvalSet,
    trl: list[TrlCheckpoint],
    trl_peak_mib: float,
    cold: DpoRun,
    warm: DpoRun,
    bare: dict[str, float],
    logits: dict[str, Any],
    imports: dict[str, Any],
    agreement: dict[str, Any],
    other_cores: float,
) -> dict[str, Any]:
    trl_total = sum(c.total_s for c in trl)
    lengths = sequence_lengths(tokenized)
    ratios = {
        "cold/TRL": cold.total_s / trl_total,
        "cold/bare": cold.total_s / bare["total_s"],
        "warm/TRL": warm.total_s / trl_total,
        "logits peak ratio": logits["ratio"],
        "import overhead ms": imports["overhead_ms"],
    }
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "other_processes_busy_cores": other_cores,
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "versions": _versions(),
            "pytest_dpo_commit": _git_describe(),
        },
        "settings": {**SETTINGS.to_dict(), "checkpoints": len(workload.checkpoints), "rows": len(tokenized.rows)},
        "workload": {
            "parameters": workload.parameters,
            "vocab_size": workload.vocab_size,
            "sequence_tokens": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)},
            "sequences_per_model": len(lengths),
            "tokens_per_model": sum(lengths),
            "padded_tokens_per_model": {
                "eval_order (TRL)": padded_tokens(tokenized, sort=False),
                "length_sorted (pytest-dpo, bare)": padded_tokens(tokenized, sort=True),
            },
        },
        "trl": {
            "total_s": trl_total,
            "construct_s": sum(c.construct_s for c in trl),
            "evaluate_s": sum(c.evaluate_s for c in trl),
            "peak_rss_mib": trl_peak_mib,
            "per_checkpoint": {c.name: {"construct_s": c.construct_s, "evaluate_s": c.evaluate_s} for c in trl},
            "metrics": {c.name: c.metrics for c in trl},
        },
        "pytest_dpo_cold": _dpo_record(cold),
        "pytest_dpo_warm": _dpo_record(warm),
        "bare": bare,
        "logits": logits,
        "import": imports,
        "parity": agreement,
        "ratios": ratios,
        "targets": TARGETS,
        "met": {name: ratios[name] <= TARGETS[name] for name in TARGETS},
    }


def _dpo_record(run: DpoRun) -> dict[str, Any]:
    return {
        "total_s": run.total_s,
        "per_checkpoint_s": run.per_checkpoint_s,
        "cache_hits": run.cache_hits,
        "cache_misses": run.cache_misses,
        "peak_rss_mib": run.peak_rss_mib,
        "breakdown_s": run.breakdown_s,
        "metrics": {name: result.metrics for name, result in run.results.items()},
    }


def _versions() -> dict[str, str]:
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}


def _git_describe() -> str:
    """The commit measured, and whether pytest_dpo had uncommitted edits (others edit it concurrently)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True).stdout.strip()

    edits = " + uncommitted pytest_dpo edits" if git("status", "--porcelain", "--", "pytest_dpo") else ""
    return (git("rev-parse", "--short", "HEAD") or "unknown") + edits


def render(summary: dict[str, Any]) -> str:
    k = summary["settings"]["checkpoints"]
    w, trl, cold, warm, bare = (summary[key] for key in ("workload", "trl", "pytest_dpo_cold", "pytest_dpo_warm", "bare"))
    ratios, met, logits, imports, agree = summary["ratios"], summary["met"], summary["logits"], summary["import"], summary["parity"]
    mark = {True: "✓", False: "✗"}
    lengths = w["sequence_tokens"]
    busy = summary["machine"]["other_processes_busy_cores"]
    lines = [
        f"K={k} checkpoints, N={summary['settings']['rows']} rows, Qwen2 {w['parameters'] / 1e6:.2f}M params "
        f"(vocab {w['vocab_size']}), sequences {lengths['min']}-{lengths['max']} tokens (median {lengths['median']:g}), "
        f"batch {SETTINGS.batch_size}, fp32, {summary['machine']['cpus']} CPUs / {summary['machine']['torch_threads']} torch threads",
        f"pytest_dpo at {summary['machine']['pytest_dpo_commit']}; "
        f"cores kept busy by other processes while measuring: {busy:.2f}"
        + ("" if busy < BUSY_CORES else "  !! machine busy: timings are not reliable"),
        "",
        f"{'':38s}{'seconds':>9s}",
        f"{'TRL evaluate(), total':38s}{trl['total_s']:9.2f}",
        f"{'TRL per checkpoint (construct+eval)':38s}{trl['total_s'] / k:9.2f}",
        f"{'TRL per checkpoint (evaluate() only)':38s}{trl['evaluate_s'] / k:9.2f}",
        f"{'pytest-dpo cold, total':38s}{cold['total_s']:9.2f}",
        f"{'pytest-dpo cold, per checkpoint':38s}   " + " ".join(f"{s:.2f}" for s in cold["per_checkpoint_s"].values()),
        f"{'pytest-dpo warm, total':38s}{warm['total_s']:9.2f}",
        f"{'bare lower bound, total (load+fwd)':38s}{bare['total_s']:9.2f}",
        f"{'bare forward passes only':38s}{bare['forward_s']:9.2f}",
        "",
        f"{'ratio':38s}{'value':>9s}  {'target':>8s}  met",
        _ratio_line("cold / TRL", ratios["cold/TRL"], "<= 0.25", met["cold/TRL"], mark),
        _ratio_line("cold / bare", ratios["cold/bare"], "<= 1.3", met["cold/bare"], mark),
        _ratio_line("warm / TRL", ratios["warm/TRL"], "<= 0.05", met["warm/TRL"], mark),
        _ratio_line("peak logits / full B*T*V logits", logits["ratio"], "<= 0.125", met["logits peak ratio"], mark),
        _ratio_line("plugin import overhead (ms)", imports["overhead_ms"], "<= 50", met["import overhead ms"], mark, ".1f"),
        "",
        f"peak logits: {logits['peak_mib']:.2f} vs {logits['full_mib']:.2f} MiB fp32 (largest chunk {logits['chunk_tokens']:,} "
        f"tokens x vocab {logits['vocab']:,})",
        f"peak resident memory added: TRL {trl['peak_rss_mib']:.0f} MiB, pytest-dpo cold {cold['peak_rss_mib']:.0f} MiB, "
        f"warm {warm['peak_rss_mib']:.0f} MiB, bare {bare['peak_rss_mib']:.0f} MiB",
        f"pytest --co: {imports['with_plugin_ms']:.0f} ms with the plugin, {imports['without_plugin_ms']:.0f} ms with -p no:dpo "
        f"(median of {IMPORT_RUNS})",
        f"cache: cold {cold['cache_hits']} hits / {cold['cache_misses']} misses, warm {warm['cache_hits']} hits / {warm['cache_misses']} misses",
        f"parity with TRL {mark[agree['match']]} (tolerance {PARITY_RELATIVE:g} relative, {PARITY_ABSOLUTE:g} absolute below 1):",
        f"  metrics vs TRL's batch-{SETTINGS.batch_size} means replayed from our per-example arrays: "
        f"max diff {agree['metrics_max_relative']:.1e} ({agree['metrics_worst']}); "
        f"rewards/accuracies max diff {agree['accuracy_max_difference']:.1e}, "
        f"rows whose decision differs: {agree['accuracy_flipped_rows']}"
        + (f" (|margin| <= {agree['accuracy_flipped_max_margin']:.1e})" if agree["accuracy_flipped_rows"] else ""),
        f"  per-example logps: max |ours - TRL| {agree['logps_max_abs']:.1e} nats, max rel {agree['logps_max_relative']:.1e}",
        f"  our whole-set means vs TRL's batch means: max diff {agree['whole_set_max_relative']:.1e} ({agree['whole_set_worst']}): "
        "TRL averages batch means, token-weighted metrics per batch",
        "cold breakdown (s): " + ", ".join(f"{name} {seconds:.2f}" for name, seconds in _largest(cold["breakdown_s"])),
    ]
    return "\n".join(lines)


def _ratio_line(label: str, value: float, target: str, ok: bool, mark: dict[bool, str], spec: str = ".3f") -> str:
    return f"{label:38s}{value:9{spec}}  {target:>8s}  {mark[ok]}"


def _largest(steps: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(steps.items(), key=lambda item: -item[1])


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=int, default=None, help="K checkpoints (default 4; --quick: 2)")
    parser.add_argument("--rows", type=int, default=None, help="N eval rows (default 256; --quick: 64)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="where the run, eval set and JSON go")
    parser.add_argument("--vocab-size", type=int, default=None, help=f"model vocab (default: Qwen2's, {QWEN2_VOCAB:,})")
    parser.add_argument("--quick", action="store_true", help="smoke run: K=2, N=64")
    args = parser.parse_args(argv)
    args.checkpoints = args.checkpoints or (2 if args.quick else 4)
    args.rows = args.rows or (64 if args.quick else 256)
    return args


def quiet_libraries() -> None:
    import datasets
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()


def warm_up(workload: Workload, batches: list[dict[str, torch.Tensor]]) -> None:
    """Imports and first-call costs (kernels, allocator) paid before any measurement, so no contestant pays them."""
    import trl  # noqa: F401

    model = load_causal_lm(str(workload.base), device="cpu", dtype=torch.float32)
    with torch.inference_mode():
        bare_log_probs(model, batches[-1])


def cpu_seconds() -> tuple[float, float]:
    """Busy CPU seconds of the whole machine (/proc/stat) and of this process with its finished children."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    machine = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    own = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return machine, sum(usage.ru_utime + usage.ru_stime for usage in own)


@contextlib.contextmanager
def other_processes_load(into: dict[str, float]) -> Iterator[None]:
    """Within: the mean number of cores other processes kept busy (the machine's busy time minus ours)."""
    start_wall, (start_machine, start_own) = time.perf_counter(), cpu_seconds()
    try:
        yield
    finally:
        machine, own = cpu_seconds()
        into["cores"] = max(0.0, (machine - start_machine) - (own - start_own)) / (time.perf_counter() - start_wall)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_libraries()
    workdir = args.workdir.resolve()
    started = time.perf_counter()
    print(f"workdir {workdir}: building or reusing the run ...", flush=True)
    workload = build_workload(workdir, args.checkpoints, args.rows, args.vocab_size)
    tokenized = tokenized_workload(workload)
    batches = sorted_batches(tokenized)
    warm_up(workload, batches)
    load: dict[str, float] = {}
    with other_processes_load(load), tempfile.TemporaryDirectory(prefix="bench-dpo-", dir=workdir) as scratch:
        print("a. TRL DPOTrainer.evaluate() per checkpoint ...", flush=True)
        trl, trl_peak_mib = run_trl(workload, Path(scratch))
        print("b. pytest-dpo cold ...", flush=True)
        cold = run_pytest_dpo(workload, Path(scratch) / "cache")
        print("c. pytest-dpo warm ...", flush=True)
        warm = run_pytest_dpo(workload, Path(scratch) / "cache")
        print("d. bare forward passes ...", flush=True)
        bare = run_bare(workload, batches)
        print("e. peak logits ...", flush=True)
        logits = measure_logits_peak(workload, tokenized)
        print("f. plugin import overhead ...", flush=True)
        imports = measure_import_overhead(workdir / "pycache")
    summary = summarise(workload, tokenized, trl, trl_peak_mib, cold, warm, bare, logits, imports, parity(trl, cold), load["cores"])
    summary["benchmark_wall_s"] = time.perf_counter() - started
    output = workdir / f"results_k{args.checkpoints}_n{args.rows}.json"
    output.write_text(json.dumps(summary, indent=2, default=str))
    print()
    print(render(summary))
    print(f"\nwrote {output} ({summary['benchmark_wall_s']:.0f}s in all)")


if __name__ == "__main__":
    main()
