"""Benchmark: pytest-dpo's checkpoint sweep against TRL 1.16 `DPOTrainer.evaluate()` and bare forward passes.

    python benchmarks/bench_evaluate.py [--checkpoints 4] [--rows 256] [--workdir DIR] [--quick]

One run builds (or reuses) a small TRL-style run in the workdir (a random-init
Qwen2 base model, K perturbed `checkpoint-N` folders, an eval set of N
standard preference rows), then measures with the same settings (beta 0.1,
sigmoid, max_length 1024, fp32, CPU, batch size 8):

  a. TRL `DPOTrainer.evaluate()` per checkpoint, the base as explicit `ref_model`;
  b. pytest-dpo cold: `evaluate_with_settings` over the K checkpoints with a fresh on-disk score cache;
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
import functools  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
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
from pytest_dpo.evalset import EvalSet, TokenizedEvalSet, load_eval_set, tokenize_eval_set  # noqa: E402
from pytest_dpo.metrics_names import METRIC_NAMES  # noqa: E402
from pytest_dpo.models import Checkpoint, discover_checkpoints, load_causal_lm  # noqa: E402
from pytest_dpo.results import EvalResult, PerExample  # noqa: E402
from pytest_dpo.settings import DPOSettings  # noqa: E402

FIXTURES = REPO_ROOT / "fixtures"
TOKENIZER_DIR = FIXTURES / "tokenizer"
DEFAULT_WORKDIR = Path(__file__).resolve().parent / ".work"

SETTINGS = DPOSettings(beta=0.1, loss_type="sigmoid", max_length=1024, batch_size=8, device="cpu", dtype="float32")
MODEL_SHAPE = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 688,
}
SEQUENCE_TOKENS = (30, 150)  # prompt + completion (BOS and EOS included) of every sequence
CHECKPOINT_NOISE = 0.01  # checkpoint k = base + k * CHECKPOINT_NOISE * std(param) * noise
DATA_SEED = 0
IMPORT_RUNS = 5
# Other processes on a 2-core machine slow torch's threads down many times over; above this, say so.
BUSY_CORES = 0.25
# TRL averages in fp32 per batch, we in fp64 over the set: differences of this size are rounding, not disagreement.
PARITY_RELATIVE = 1e-5
PARITY_ABSOLUTE = 1e-6
# A realistic vocab, to project the chunked LM head's saving beyond this benchmark's tiny vocab.
PROJECTED_VOCAB = 151_936  # Qwen2

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
    vocab = vocab_size or len(tokenizer)
    base = workdir / "base"
    manifest = {"shape": MODEL_SHAPE, "vocab_size": vocab, "noise": CHECKPOINT_NOISE, "format": 2}
    fresh = _read_json(workdir / "manifest.json") != manifest
    if fresh or not (base / "model.safetensors").exists():
        _remove_tree(workdir / "run")
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


def new_base_model(tokenizer: Any, vocab_size: int) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        **MODEL_SHAPE,
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
    rng = random.Random(DATA_SEED)
    triples = source_triples()
    sentences = [text.strip() for _, chosen, rejected in triples for text in (chosen, rejected) if text.strip()]
    shots = [f"{prompt}{chosen}" for prompt, chosen, _ in triples]
    length = functools.partial(_token_count, tokenizer)
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


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def tokenized_workload(workload: Workload) -> TokenizedEvalSet:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(workload.base))
    return tokenize_eval_set(load_eval_set(workload.eval_file), tokenizer, SETTINGS.max_length, SETTINGS.truncation_mode)


def sequence_lengths(tokenized: TokenizedEvalSet) -> list[int]:
    pairs = [scoring.sequence_pair(row, SETTINGS.max_length, SETTINGS.truncation_mode) for row in tokenized.rows]
    return [len(ids) for pair in pairs for ids in (pair[0], pair[2])]


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


# What evaluate_with_settings calls, by the name it looks up in pytest_dpo.evaluation at call time.
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
    "_free_memory",
)


@contextlib.contextmanager
def breakdown(into: dict[str, float]) -> Iterator[None]:
    """Time every step of `evaluate_with_settings` (wrappers cost microseconds against seconds of work)."""
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


def trl_checkpoint(checkpoint: Path, workload: Workload, rows: list[dict[str, Any]], output_dir: Path) -> TrlCheckpoint:
    """What a user pays for one checkpoint with TRL: load both models, build the trainer, evaluate()."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    times: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()), stopwatch(times, "construct"):
        model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
        ref_model = AutoModelForCausalLM.from_pretrained(str(workload.base), dtype=torch.float32)
        config = DPOConfig(
            output_dir=str(output_dir),
            per_device_eval_batch_size=SETTINGS.batch_size,
            beta=SETTINGS.beta,
            loss_type=list(SETTINGS.loss_type),
            max_length=SETTINGS.max_length,
            report_to=[],
            use_cpu=True,
            bf16=False,
            fp16=False,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
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
        metrics={name: float(metrics[f"eval_{name}"]) for name in METRIC_NAMES},
        logps=trl_per_example_logps(trainer),
    )


def trl_per_example_logps(trainer: Any) -> dict[str, torch.Tensor]:
    """TRL's own per-example log-probs (untimed), through `compute_ref_log_probs` as tests/trl_reference.py does."""
    prepared = trainer.eval_dataset
    out: dict[str, list[torch.Tensor]] = {key: [] for key in ("policy_chosen", "policy_rejected", "reference_chosen", "reference_rejected")}
    trainer.model.eval()
    for start in range(0, len(prepared), SETTINGS.batch_size):
        batch = trainer.data_collator([prepared[i] for i in range(start, min(start + SETTINGS.batch_size, len(prepared)))])
        for role, model in (("policy", trainer.model), ("reference", trainer.ref_model)):
            chosen, rejected = trainer.compute_ref_log_probs(model, batch)
            out[f"{role}_chosen"].append(chosen.cpu())
            out[f"{role}_rejected"].append(rejected.cpu())
    return {key: torch.cat(parts) for key, parts in out.items()}


def run_trl(workload: Workload, scratch: Path) -> list[TrlCheckpoint]:
    rows = [json.loads(line) for line in workload.eval_file.read_text(encoding="utf-8").splitlines()]
    return [trl_checkpoint(path, workload, rows, scratch / "trl" / path.name) for path in workload.checkpoints]


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
    breakdown_s: dict[str, float] = field(default_factory=dict)


def run_pytest_dpo(workload: Workload, cache_dir: Path) -> DpoRun:
    """A sweep as the plugin's session runs it: the eval set loaded once, one score cache shared by all checkpoints."""
    steps: dict[str, float] = {}
    per_checkpoint: dict[str, float] = {}
    results: dict[str, EvalResult] = {}
    start = time.perf_counter()
    with breakdown(steps):
        with stopwatch(steps, "load_eval_set + discover"):
            eval_set = load_eval_set(workload.eval_file)
            checkpoints = sweep_checkpoints(workload)
        cache = ScoreCache(cache_dir)
        for checkpoint in checkpoints:
            with stopwatch(per_checkpoint, checkpoint.name):
                results[checkpoint.name] = evaluation.evaluate_with_settings(
                    checkpoint, eval_set, str(workload.base), SETTINGS, cache
                )
    total = time.perf_counter() - start
    return DpoRun(total, per_checkpoint, results, cache.stats.hits, cache.stats.misses, steps)


def sweep_checkpoints(workload: Workload) -> list[Checkpoint]:
    wanted = {path.resolve() for path in workload.checkpoints}
    run_dir = workload.checkpoints[0].parent
    return [checkpoint for checkpoint in discover_checkpoints(run_dir) if checkpoint.path.resolve() in wanted]


# --------------------------------------------------------------------------------------------------------------------
# d. Bare lower bound
# --------------------------------------------------------------------------------------------------------------------


def sorted_batches(tokenized: TokenizedEvalSet) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Input ids and attention masks: rows sorted by length, a row's chosen and rejected in the same batch."""
    pairs = [scoring.sequence_pair(row, SETTINGS.max_length, SETTINGS.truncation_mode) for row in tokenized.rows]
    order = sorted(range(len(pairs)), key=lambda i: -max(len(pairs[i][0]), len(pairs[i][2])))
    batches = []
    for start in range(0, len(order), SETTINGS.batch_size):
        chunk = [pairs[i] for i in order[start : start + SETTINGS.batch_size]]
        sequences = [pair[0] for pair in chunk] + [pair[2] for pair in chunk]
        width = max(map(len, sequences))
        ids = torch.zeros(len(sequences), width, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, sequence in enumerate(sequences):
            ids[i, : len(sequence)] = torch.tensor(sequence)
            attention[i, : len(sequence)] = 1
        batches.append((ids, attention))
    return batches


def run_bare(workload: Workload, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """K+1 models (the checkpoints and the reference), each loaded and run over the batches: nothing else."""
    from transformers import AutoModelForCausalLM

    times: dict[str, float] = {}
    for path in [workload.base, *workload.checkpoints]:
        with stopwatch(times, "load"):
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        with stopwatch(times, "forward"), torch.inference_mode():
            for ids, attention in batches:
                model(input_ids=ids, attention_mask=attention).logits
        del model
    return {"load_s": times["load"], "forward_s": times["forward"], "total_s": times["load"] + times["forward"]}


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


def measure_logits_peak(workload: Workload, tokenized: TokenizedEvalSet) -> dict[str, Any]:
    """Largest logits chunk pytest-dpo builds vs the fp32 B x T x V logits of its largest batch."""
    record: dict[str, int] = {}
    original = scoring._completion_sums

    def recording_sums(hidden: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, head: Any, transform: Any) -> Any:
        vocab = head.weight.shape[0]
        full = hidden.shape[0] * (hidden.shape[1] + 1) * vocab  # the model's logits cover every position
        record["full_elements"] = max(record.get("full_elements", 0), full)
        return original(hidden, labels, mask, RecordingHead(head, record), transform)

    model = load_causal_lm(str(workload.checkpoints[0]), device="cpu", dtype=torch.float32)
    with patched(scoring, "_completion_sums", recording_sums):
        scoring.score(model, tokenized, batch_size=SETTINGS.batch_size, max_length=SETTINGS.max_length,
                      truncation_mode=SETTINGS.truncation_mode)
    return logits_summary(record["peak_elements"], record["full_elements"], workload.vocab_size, tokenized)


def logits_summary(peak: int, full: int, vocab: int, tokenized: TokenizedEvalSet) -> dict[str, Any]:
    chunk_tokens = max(1, scoring.LOGITS_BUDGET // (2 * vocab))
    longest = max(sequence_lengths(tokenized))
    projected_chunk = max(1, scoring.LOGITS_BUDGET // (2 * PROJECTED_VOCAB)) * PROJECTED_VOCAB
    projected_full = 2 * SETTINGS.batch_size * longest * PROJECTED_VOCAB
    return {
        "vocab": vocab,
        "chunk_tokens": chunk_tokens,
        "peak_elements": peak,
        "full_elements": full,
        "peak_mib": peak * 4 / 2**20,
        "full_mib": full * 4 / 2**20,
        "ratio": peak / full,
        "projected_vocab": PROJECTED_VOCAB,
        "projected_ratio": min(1.0, projected_chunk / projected_full),
        "projected_peak_mib": projected_chunk * 4 / 2**20,
        "projected_full_mib": projected_full * 4 / 2**20,
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
    per_batch = [_batch_metrics(p, part) for part in batches]
    sizes = [len(p.rows[part]) for part in batches]
    metrics = {name: sum(m[name] for m in per_batch) / len(per_batch) for name in METRIC_NAMES}
    metrics["loss"] = sum(m["loss"] * n for m, n in zip(per_batch, sizes)) / sum(sizes)
    return metrics


def _batch_metrics(p: PerExample, part: slice) -> dict[str, float]:
    def mean(values: torch.Tensor) -> float:
        return values[part].double().mean().item()

    def ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> float:
        total = denominator[part].double().sum().item()
        return numerator[part].double().sum().item() / total if total else 0.0

    return {
        "loss": mean(p.losses),
        "rewards/chosen": mean(p.chosen_rewards),
        "rewards/rejected": mean(p.rejected_rewards),
        "rewards/margins": mean(p.margins),
        "rewards/accuracies": mean((p.chosen_rewards > p.rejected_rewards).double()),
        "logps/chosen": mean(p.policy_chosen_logps),
        "logps/rejected": mean(p.policy_rejected_logps),
        "logits/chosen": ratio(p.chosen_logits_sum, p.chosen_scored_tokens),
        "logits/rejected": ratio(p.rejected_logits_sum, p.rejected_scored_tokens),
        "entropy": ratio(p.chosen_entropy_sum + p.rejected_entropy_sum, p.chosen_scored_tokens + p.rejected_scored_tokens),
        "mean_token_accuracy": ratio(p.chosen_top1, p.chosen_scored_tokens),
    }


def relative_difference(ours: float, theirs: float) -> float:
    return abs(ours - theirs) / max(abs(theirs), PARITY_ABSOLUTE / PARITY_RELATIVE)


def parity(trl: list[TrlCheckpoint], dpo: DpoRun) -> dict[str, Any]:
    """Largest disagreements over all checkpoints: replayed batch metrics, whole-set metrics, per-example logps."""
    replayed, whole_set, logps = [], [], []
    for checkpoint in trl:
        result = dpo.results[checkpoint.name]
        batch_means = trl_batch_metrics(result.per_example, SETTINGS.batch_size)
        for name in METRIC_NAMES:
            replayed.append((relative_difference(batch_means[name], checkpoint.metrics[name]), checkpoint.name, name))
            whole_set.append((relative_difference(result.metrics[name], checkpoint.metrics[name]), checkpoint.name, name))
        for key, theirs in checkpoint.logps.items():
            ours = getattr(result.per_example, f"{key}_logps")
            difference = (ours - theirs).abs()
            logps.append((difference.max().item(), (difference / theirs.abs().clamp(min=1e-6)).max().item(), checkpoint.name, key))
    worst_replayed, worst_whole, worst_logps = max(replayed), max(whole_set), max(logps)
    return {
        "metrics_max_relative": worst_replayed[0],
        "metrics_worst": f"{worst_replayed[1]} {worst_replayed[2]}",
        "metrics_match": worst_replayed[0] <= PARITY_RELATIVE,
        "whole_set_max_relative": worst_whole[0],
        "whole_set_worst": f"{worst_whole[1]} {worst_whole[2]}",
        "logps_max_abs": worst_logps[0],
        "logps_max_relative": max(entry[1] for entry in logps),
        "logps_worst": f"{worst_logps[2]} {worst_logps[3]}",
        "tolerance": {"relative": PARITY_RELATIVE, "absolute": PARITY_ABSOLUTE},
    }


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------


def summarise(
    workload: Workload,
    tokenized: TokenizedEvalSet,
    trl: list[TrlCheckpoint],
    cold: DpoRun,
    warm: DpoRun,
    bare: dict[str, float],
    logits: dict[str, Any],
    imports: dict[str, Any],
    agreement: dict[str, Any],
    loads: dict[str, float],
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
            "other_processes_busy_cores": loads,
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "versions": _versions(),
        },
        "settings": {**SETTINGS.to_dict(), "checkpoints": len(workload.checkpoints), "rows": len(tokenized.rows)},
        "workload": {
            "parameters": workload.parameters,
            "vocab_size": workload.vocab_size,
            "sequence_tokens": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)},
            "sequences_per_model": len(lengths),
            "tokens_per_model": sum(lengths),
        },
        "trl": {
            "total_s": trl_total,
            "construct_s": sum(c.construct_s for c in trl),
            "evaluate_s": sum(c.evaluate_s for c in trl),
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
        "breakdown_s": run.breakdown_s,
        "metrics": {name: result.metrics for name, result in run.results.items()},
    }


def _versions() -> dict[str, str]:
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}


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
        f"CPU cores busy with other processes: {busy['before']:.2f} before, {busy['after']:.2f} after"
        + ("" if max(busy.values()) < BUSY_CORES else "  !! machine busy: timings are not reliable"),
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
        f"peak logits: {logits['peak_elements']:,} vs {logits['full_elements']:,} fp32 elements "
        f"({logits['peak_mib']:.2f} vs {logits['full_mib']:.2f} MiB; chunk {logits['chunk_tokens']:,} tokens at vocab {logits['vocab']}); "
        f"projected at vocab {logits['projected_vocab']:,}: {logits['projected_peak_mib']:.0f} vs {logits['projected_full_mib']:.0f} MiB "
        f"= {logits['projected_ratio']:.4f}",
        f"pytest --co: {imports['with_plugin_ms']:.0f} ms with the plugin, {imports['without_plugin_ms']:.0f} ms with -p no:dpo "
        f"(median of {IMPORT_RUNS})",
        f"cache: cold {cold['cache_hits']} hits / {cold['cache_misses']} misses, warm {warm['cache_hits']} hits / {warm['cache_misses']} misses",
        f"parity with TRL (batch {SETTINGS.batch_size}, batch means replayed from our per-example arrays): "
        f"max rel {agree['metrics_max_relative']:.2e} ({agree['metrics_worst']}) {mark[agree['metrics_match']]}; "
        f"per-example logps max |diff| {agree['logps_max_abs']:.2e} (rel {agree['logps_max_relative']:.2e}); "
        f"our whole-set means vs TRL's batch means: max rel {agree['whole_set_max_relative']:.2e} ({agree['whole_set_worst']})",
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
    parser.add_argument("--vocab-size", type=int, default=None, help="model vocab (default: the fixture tokenizer's)")
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


def warm_up(workload: Workload, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Imports and first-call costs (kernels, allocator) paid before any measurement, so no contestant pays them."""
    import trl  # noqa: F401

    model = load_causal_lm(str(workload.base), device="cpu", dtype=torch.float32)
    with torch.inference_mode():
        model(input_ids=batches[0][0], attention_mask=batches[0][1])


def busy_cores(seconds: float = 1.0) -> float:
    """How many cores other processes keep busy, from /proc/stat over `seconds` while this one sleeps."""
    def busy_jiffies() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values) - idle, sum(values)

    if not Path("/proc/stat").exists():
        return math.nan
    busy_start, total_start = busy_jiffies()
    time.sleep(seconds)
    busy_end, total_end = busy_jiffies()
    return (os.cpu_count() or 1) * (busy_end - busy_start) / max(1, total_end - total_start)


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
    loads = {"before": busy_cores()}
    with tempfile.TemporaryDirectory(prefix="bench-dpo-", dir=workdir) as scratch_dir:
        scratch = Path(scratch_dir)
        print("a. TRL DPOTrainer.evaluate() per checkpoint ...", flush=True)
        trl = run_trl(workload, scratch)
        print("b. pytest-dpo cold ...", flush=True)
        cold = run_pytest_dpo(workload, scratch / "cache")
        print("c. pytest-dpo warm ...", flush=True)
        warm = run_pytest_dpo(workload, scratch / "cache")
    print("d. bare forward passes ...", flush=True)
    bare = run_bare(workload, batches)
    print("e. peak logits ...", flush=True)
    logits = measure_logits_peak(workload, tokenized)
    print("f. plugin import overhead ...", flush=True)
    imports = measure_import_overhead(workdir / "pycache")
    loads["after"] = busy_cores()
    summary = summarise(workload, tokenized, trl, cold, warm, bare, logits, imports, parity(trl, cold), loads)
    summary["benchmark_wall_s"] = time.perf_counter() - started
    output = workdir / f"results_k{args.checkpoints}_n{args.rows}.json"
    output.write_text(json.dumps(summary, indent=2, default=str))
    print()
    print(render(summary))
    print(f"\nwrote {output} ({summary['benchmark_wall_s']:.0f}s in all)")


if __name__ == "__main__":
    main()
