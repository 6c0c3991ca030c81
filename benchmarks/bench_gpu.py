"""Benchmark on one GPU: pytest-dpo's `CheckpointEvaluation.score()` against TRL 1.16 `DPOTrainer.evaluate()`.

    python benchmarks/bench_gpu.py [--batch-sizes 4,8,16] [--quick] [--device cuda] [--tiny] [--workdir DIR]

One unattended run (about 5-8 minutes on one H100) that:

  1. builds (or reuses) under the workdir a random-init Qwen2 of Qwen2-0.5B's shape (no download), saved in bf16
     as a base and K=2 perturbed `checkpoint-N` folders with the tokenizer files, and an eval set of N=512
     standard preference rows (prompts ~50-400 tokens, completions ~20-300);
  2. for each batch size, in bf16 on the device, times each checkpoint end to end (load both models, tokenize,
     score policy and reference) with pytest-dpo (a fresh in-memory score cache, so the reference runs every
     time, as in TRL) and with TRL (`ref_model` = the base), after an untimed warm-up of both; tokens/s counts
     each row's prompt and both completions once per model pass, peak is `torch.cuda.max_memory_allocated()`;
  3. compares the two's loss and rewards/accuracies per checkpoint and batch size (reported, not asserted);
  4. runs the `gpu`-marked tests in a subprocess;
  5. prints one table to paste into the README and writes the numbers as JSON into the workdir.

`--device cpu --tiny` runs the same pipeline on a tiny model in float32 on CPU, as a smoke test.
"""

from __future__ import annotations

import os

# The gpu tests run in the environment this script was started with, not the offline one bench_evaluate sets.
TEST_ENVIRONMENT = dict(os.environ)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_evaluate as shared  # noqa: E402  (sets the offline environment, puts the repo on sys.path)
import torch  # noqa: E402

from pytest_dpo import evaluation  # noqa: E402
from pytest_dpo.cache import ScoreCache  # noqa: E402
from pytest_dpo.checkpoints import discover_checkpoints  # noqa: E402
from pytest_dpo.evalset import load_eval_set  # noqa: E402
from pytest_dpo.loading import free_memory, load_causal_lm  # noqa: E402
from pytest_dpo.results import PerExample  # noqa: E402
from pytest_dpo.settings import DPOSettings  # noqa: E402
from pytest_dpo.tokenization import TokenizedRow, tokenize_eval_set  # noqa: E402

REPO_ROOT = shared.REPO_ROOT
DEFAULT_WORKDIR = Path(__file__).resolve().parent / ".work" / "gpu"

QWEN2_05B_SHAPE = {
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
}
TINY_SHAPE = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 256,
}
# TRL materialises B x T x V logits: with Qwen2's vocabulary, batch 16 of ~700-token rows in fp32 is ~14 GB of CPU RAM.
TINY_VOCAB = 8192
ROPE_THETA = 1_000_000.0
PROMPT_TOKENS = (50, 400)
COMPLETION_TOKENS = (20, 300)
BETA = 0.1
MAX_LENGTH = 1024
CHECKPOINT_NOISE = shared.CHECKPOINT_NOISE
WARMUP_ROWS = 16
GPU_TESTS_TIMEOUT_S = 180
# bf16 rounding: sequence log-probs of hundreds of nats agree to ~1e-2 relative, so the loss does too.
LOSS_RELATIVE = 2e-2
# A reward margin this close to 0 is within bf16 rounding of the log-probs: its accuracy decision is a coin flip.
TIE_MARGIN = 1e-2


@dataclass(frozen=True)
class Plan:
    """What one run builds and measures, from the command line."""

    device: str
    dtype: str
    shape_name: str
    shape: dict[str, int]
    vocab_size: int
    checkpoints: int
    rows: int
    batch_sizes: tuple[int, ...]
    workdir: Path


@dataclass(frozen=True)
class Workload:
    """The models and eval rows on disk, and what the table's header says about them."""

    base: Path
    checkpoints: list[Path]
    eval_file: Path
    parameters: int
    rows: list[TokenizedRow]


@dataclass
class Measurement:
    """One contestant on one checkpoint at one batch size; `metrics` as TRL reports them (pytest-dpo's replayed
    from its per-example arrays as TRL's batch means)."""

    contestant: str
    checkpoint: str
    batch_size: int
    seconds: float
    tokens: int
    peak_gib: float | None
    metrics: dict[str, float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


@dataclass(frozen=True)
class TableRow:
    """One batch size's line of the table: tokens/s and peak memory of each contestant over all checkpoints."""

    batch_size: int
    dpo_tokens_per_s: float
    trl_tokens_per_s: float
    dpo_peak_gib: float | None
    trl_peak_gib: float | None

    @property
    def speed_up(self) -> float:
        return self.dpo_tokens_per_s / self.trl_tokens_per_s


@dataclass(frozen=True)
class Parity:
    """pytest-dpo vs TRL on one checkpoint at one batch size."""

    checkpoint: str
    batch_size: int
    loss_relative: float
    accuracy_difference: float
    near_tie_fraction: float

    @property
    def within_tolerance(self) -> bool:
        """Loss within LOSS_RELATIVE; accuracy off by at most the rows whose decision is a bf16 coin flip."""
        return self.loss_relative <= LOSS_RELATIVE and self.accuracy_difference <= self.near_tie_fraction + 1e-9


@dataclass(frozen=True)
class GpuTests:
    """What `pytest -m gpu` said."""

    summary: str
    failed: list[str] = field(default_factory=list)
    returncode: int | None = None


# --------------------------------------------------------------------------------------------------------------------
# Setup: the run and the eval set
# --------------------------------------------------------------------------------------------------------------------


def build_workload(plan: Plan) -> Workload:
    """The base model, K checkpoints and the eval set, each reused when already in the workdir with the same shape."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(shared.TOKENIZER_DIR))
    tokenizer.pad_token = tokenizer.eos_token  # keeps its vocabulary inside the model's (see bench_evaluate)
    folder = plan.workdir / plan.shape_name
    base = folder / "base"
    manifest = {
        "shape": plan.shape,
        "vocab_size": plan.vocab_size,
        "rope_theta": ROPE_THETA,
        "noise": CHECKPOINT_NOISE,
        "seed": shared.DATA_SEED,
        "format": 1,
    }
    if shared._read_json(folder / "manifest.json") != manifest or not has_weights(base):
        for stale in folder.glob("**/model*.safetensors"):
            stale.unlink()
        print(f"building {plan.shape_name} base model ...", flush=True)
        save_bf16(new_base_model(plan, tokenizer), tokenizer, base)
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    checkpoints = [
        ensure_checkpoint(base, tokenizer, folder / "run" / f"checkpoint-{k}", k)
        for k in range(1, plan.checkpoints + 1)
    ]
    eval_file = plan.workdir / f"eval_{plan.rows}.jsonl"
    if not eval_file.exists():
        shared.write_jsonl(eval_file, make_eval_rows(plan.rows, AutoTokenizer.from_pretrained(str(base))))
    tokenized = tokenize_eval_set(
        load_eval_set(eval_file), AutoTokenizer.from_pretrained(str(base)), MAX_LENGTH, "keep_start"
    )
    return Workload(base, checkpoints, eval_file, parameter_count(base), tokenized.rows)


def new_base_model(plan: Plan, tokenizer: Any) -> torch.nn.Module:
    """A seeded random-init Qwen2 of the plan's shape, with tied embeddings and rope theta 1e6 as Qwen2-0.5B."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=plan.vocab_size,
        max_position_embeddings=MAX_LENGTH * 2,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        **plan.shape,
    )
    torch.manual_seed(shared.DATA_SEED)
    return Qwen2ForCausalLM(config).eval()


def ensure_checkpoint(base: Path, tokenizer: Any, folder: Path, k: int) -> Path:
    """`checkpoint-k`: the base in fp32 plus seeded noise that grows with k, saved in bf16."""
    if has_weights(folder):
        return folder
    model = load_causal_lm(str(base), device="cpu", dtype=torch.float32)
    generator = torch.Generator().manual_seed(1000 + k)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(noise * parameter.std().nan_to_num(0.0) * (k * CHECKPOINT_NOISE))
    save_bf16(model, tokenizer, folder)
    return folder


def save_bf16(model: torch.nn.Module, tokenizer: Any, folder: Path) -> None:
    shared.save_model(model.to(torch.bfloat16), tokenizer, folder)


def has_weights(folder: Path) -> bool:
    return any(folder.glob("model*.safetensors"))


def parameter_count(folder: Path) -> int:
    """Parameters stored in a model folder's safetensors files (a tied LM head is stored once), read from headers."""
    from safetensors import safe_open

    total = 0
    for path in folder.glob("model*.safetensors"):
        with safe_open(str(path), "pt") as weights:
            names = weights.keys()  # noqa: SIM118  (safe_open is not iterable)
            total += sum(math.prod(weights.get_slice(name).get_shape()) for name in names)
    return total


def make_eval_rows(count: int, tokenizer: Any) -> list[dict[str, str]]:
    """`count` standard rows: a prompt of PROMPT_TOKENS, each completion COMPLETION_TOKENS."""
    return shared.rows_of_lengths(count, tokenizer, PROMPT_TOKENS, COMPLETION_TOKENS)


# --------------------------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------------------------


def scored_tokens(rows: Sequence[TokenizedRow]) -> int:
    """Tokens both contestants must score for one checkpoint: each row's prompt and both completions, once in the
    policy's pass and once in the reference's (what TRL runs twice or pads is not counted)."""
    return 2 * sum(len(row.prompt_ids) + len(row.chosen_ids) + len(row.rejected_ids) for row in rows)


@contextlib.contextmanager
def device_clock(device: str, into: dict[str, Any]) -> Iterator[None]:
    """Within: `seconds` of wall time with the GPU's queue drained at both ends, and `peak_gib`, the most memory
    allocated on the GPU meanwhile (None off CUDA)."""
    cuda = torch.device(device).type == "cuda"
    free_memory()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    yield
    if cuda:
        torch.cuda.synchronize()
    into["seconds"] = time.perf_counter() - start
    into["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None


def dpo_settings(plan: Plan, batch_size: int) -> DPOSettings:
    return DPOSettings(batch_size=batch_size, dtype=plan.dtype, device=plan.device, max_length=MAX_LENGTH, beta=BETA)


def run_pytest_dpo(checkpoint: Path, base: Path, rows: list[dict[str, str]], settings: DPOSettings) -> PerExample:
    """One checkpoint as `evaluate()` scores it, with a fresh in-memory score cache (nothing read from disk)."""
    target = discover_checkpoints(checkpoint)[0]
    run = evaluation.CheckpointEvaluation(target, load_eval_set(rows), str(base), settings, ScoreCache())
    return run.score().per_example


def trl_config_kwargs(plan: Plan, batch_size: int) -> dict[str, Any]:
    """bench_evaluate's `DPOConfig` arguments (beta 0.1, sigmoid, max_length 1024, no logging) on the plan's device."""
    return {
        **shared.trl_config_kwargs(),
        "per_device_eval_batch_size": batch_size,
        "use_cpu": torch.device(plan.device).type == "cpu",
        "bf16": plan.dtype == "bfloat16",
    }


def run_trl(
    checkpoint: Path, base: Path, rows: list[dict[str, str]], plan: Plan, batch_size: int, output_dir: Path
) -> dict[str, float]:
    """One checkpoint as a TRL user evaluates it: both models loaded in the plan's dtype, a trainer, `evaluate()`."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    dtype = getattr(torch, plan.dtype)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = DPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=dtype),
            ref_model=AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype),
            args=DPOConfig(output_dir=str(output_dir), **trl_config_kwargs(plan, batch_size)),
            # TRL requires a train set; one row keeps its tokenization out of the way.
            train_dataset=Dataset.from_list(rows[:1]),
            eval_dataset=Dataset.from_list(rows),
            processing_class=AutoTokenizer.from_pretrained(str(checkpoint)),
        )
        metrics = trainer.evaluate()
    return {name: float(metrics[f"eval_{name}"]) for name in shared.DENSE_METRICS}


def measure(plan: Plan, workload: Workload, scratch: Path) -> tuple[list[Measurement], list[Parity]]:
    """Every batch size x checkpoint, pytest-dpo and TRL in turn, after one untimed warm-up of each."""
    rows = read_jsonl(workload.eval_file)
    tokens = scored_tokens(workload.rows)
    first = workload.checkpoints[0]
    print("warm-up (untimed) ...", flush=True)
    run_pytest_dpo(first, workload.base, rows[:WARMUP_ROWS], dpo_settings(plan, plan.batch_sizes[0]))
    run_trl(first, workload.base, rows[:WARMUP_ROWS], plan, plan.batch_sizes[0], scratch / "warm-up")
    measurements: list[Measurement] = []
    parities: list[Parity] = []
    for batch_size in plan.batch_sizes:
        for checkpoint in workload.checkpoints:
            timing: dict[str, Any] = {}
            with device_clock(plan.device, timing):
                ours = run_pytest_dpo(checkpoint, workload.base, rows, dpo_settings(plan, batch_size))
            dpo = Measurement(
                "pytest-dpo",
                checkpoint.name,
                batch_size,
                timing["seconds"],
                tokens,
                timing["peak_gib"],
                shared.trl_batch_metrics(ours, batch_size),
            )
            with device_clock(plan.device, timing):
                theirs = run_trl(
                    checkpoint, workload.base, rows, plan, batch_size, scratch / f"trl-{batch_size}-{checkpoint.name}"
                )
            trl = Measurement("TRL", checkpoint.name, batch_size, timing["seconds"], tokens, timing["peak_gib"], theirs)
            measurements += [dpo, trl]
            parities.append(compare(ours, dpo.metrics, theirs, checkpoint.name, batch_size))
            print(
                f"  batch {batch_size:>3} {checkpoint.name}: pytest-dpo {dpo.seconds:7.2f}s, TRL {trl.seconds:7.2f}s",
                flush=True,
            )
    return measurements, parities


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def compare(
    ours: PerExample, replayed: dict[str, float], trl: dict[str, float], checkpoint: str, batch_size: int
) -> Parity:
    """Our metrics replayed as TRL's batch means against TRL's, and the share of rows whose accuracy is a coin flip."""
    return Parity(
        checkpoint=checkpoint,
        batch_size=batch_size,
        loss_relative=abs(replayed["loss"] - trl["loss"]) / max(abs(trl["loss"]), 1e-12),
        accuracy_difference=abs(replayed["rewards/accuracies"] - trl["rewards/accuracies"]),
        near_tie_fraction=float((ours.margins.abs() <= TIE_MARGIN).float().mean()),
    )


# --------------------------------------------------------------------------------------------------------------------
# The gpu tests
# --------------------------------------------------------------------------------------------------------------------


def run_gpu_tests() -> GpuTests:
    """`pytest -m gpu` over the test suite in a subprocess, in the environment this script was started with."""
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
    try:
        done = subprocess.run(
            command,
            cwd=REPO_ROOT,
            env=TEST_ENVIRONMENT,
            capture_output=True,
            text=True,
            timeout=GPU_TESTS_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return GpuTests(f"timed out after {GPU_TESTS_TIMEOUT_S}s")
    return GpuTests(pytest_summary(done.stdout or done.stderr), failed_tests(done.stdout), done.returncode)


def pytest_summary(output: str) -> str:
    """pytest's closing line (`3 passed, 2 skipped, 900 deselected in 12.0s`), without its `=` rule."""
    lines = [line.strip(" =") for line in output.splitlines() if line.strip(" =")]
    return lines[-1] if lines else "no output"


def failed_tests(output: str) -> list[str]:
    """The `FAILED ...` / `ERROR ...` lines of pytest's short summary."""
    return [line for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------


def table_rows(measurements: Sequence[Measurement]) -> list[TableRow]:
    """Per batch size: each contestant's tokens over its seconds summed over the checkpoints, and its highest peak."""
    rows = []
    for batch_size in sorted({m.batch_size for m in measurements}):
        totals = {}
        for contestant in ("pytest-dpo", "TRL"):
            mine = [m for m in measurements if m.batch_size == batch_size and m.contestant == contestant]
            peaks = [m.peak_gib for m in mine if m.peak_gib is not None]
            totals[contestant] = (
                sum(m.tokens for m in mine) / sum(m.seconds for m in mine),
                max(peaks) if peaks else None,
            )
        rows.append(
            TableRow(batch_size, totals["pytest-dpo"][0], totals["TRL"][0], totals["pytest-dpo"][1], totals["TRL"][1])
        )
    return rows


def format_table(rows: Sequence[TableRow]) -> str:
    """A Markdown table: batch size x pytest-dpo tokens/s, TRL tokens/s, speed-up, each one's peak GiB."""
    header = "| batch size | pytest-dpo tokens/s | TRL tokens/s | speed-up | pytest-dpo peak GiB | TRL peak GiB |"
    lines = [header, "|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row.batch_size} | {row.dpo_tokens_per_s:,.0f} | {row.trl_tokens_per_s:,.0f} | {row.speed_up:.2f}× "
            f"| {_gib(row.dpo_peak_gib)} | {_gib(row.trl_peak_gib)} |"
        )
    return "\n".join(lines)


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_parity(parities: Sequence[Parity]) -> str:
    """The largest disagreements over every checkpoint and batch size, in one line."""
    mark = "✓" if all(p.within_tolerance for p in parities) else "✗"
    return (
        f"parity with TRL {mark} (max over {len(parities)} checkpoint x batch size runs): "
        f"loss rel diff {max(p.loss_relative for p in parities):.1e} (tolerance {LOSS_RELATIVE:g}); "
        f"rewards/accuracies diff {max(p.accuracy_difference for p in parities):.4f} "
        f"(rows with |margin| <= {TIE_MARGIN:g}: up to {max(p.near_tie_fraction for p in parities):.4f} of the set)"
    )


def format_header(plan: Plan, workload: Workload, versions: dict[str, str]) -> str:
    """What was measured where: the device and versions, the model, the eval set's lengths, the settings."""
    prompts = [len(row.prompt_ids) for row in workload.rows]
    completions = [len(ids) for row in workload.rows for ids in (row.chosen_ids, row.rejected_ids)]
    machine = (
        f"{versions['device']}; torch {versions['torch']}, transformers {versions['transformers']}, "
        f"trl {versions['trl']}; pytest_dpo at {versions['pytest_dpo']}"
    )
    model = (
        f"Qwen2 {plan.shape_name} random init, {workload.parameters / 1e6:.1f}M parameters "
        f"(vocab {plan.vocab_size:,}), {plan.dtype} on {plan.device}; beta {BETA}, max_length {MAX_LENGTH}"
    )
    data = (
        f"K={len(workload.checkpoints)} checkpoints, N={len(workload.rows)} rows: prompts "
        f"{min(prompts)}-{max(prompts)} tokens (median {statistics.median(prompts):g}), completions "
        f"{min(completions)}-{max(completions)} "
        f"(median {statistics.median(completions):g}); {scored_tokens(workload.rows):,} scored tokens per checkpoint"
    )
    timing = "each checkpoint timed end to end: load both models, tokenize, score policy and reference"
    return "\n".join([machine, model, data, timing])


def format_tests(tests: GpuTests) -> str:
    return "\n".join([f"gpu tests: {tests.summary}", *(f"  {line}" for line in tests.failed)])


def versions(device: str) -> dict[str, str]:
    """The device's name, the libraries' versions and the commit measured."""
    name = (
        torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    )
    return {"device": name, **shared._versions(), "pytest_dpo": shared._git_describe()}


def results_record(
    plan: Plan,
    workload: Workload,
    measured_with: dict[str, str],
    measurements: Sequence[Measurement],
    parities: Sequence[Parity],
    tests: GpuTests,
) -> dict[str, Any]:
    """Everything the report shows and the per-checkpoint numbers behind it, as JSON-ready values."""
    return {
        "plan": {**asdict(plan), "workdir": str(plan.workdir)},
        "versions": measured_with,
        "parameters": workload.parameters,
        "scored_tokens_per_checkpoint": scored_tokens(workload.rows),
        "table": [asdict(row) | {"speed_up": row.speed_up} for row in table_rows(measurements)],
        "measurements": [asdict(m) | {"tokens_per_s": m.tokens_per_s} for m in measurements],
        "parity": [asdict(p) | {"within_tolerance": p.within_tolerance} for p in parities],
        "gpu_tests": asdict(tests),
    }


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------


def batch_sizes(text: str) -> tuple[int, ...]:
    """`--batch-sizes 4,8,16` as (4, 8, 16)."""
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--batch-sizes {text!r}: give positive whole numbers, e.g. 4,8,16")
    return sizes


def parse_args(argv: Sequence[str] | None = None) -> Plan:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--batch-sizes", type=batch_sizes, default=None, help="comma-separated (default 4,8,16; --quick: 8)"
    )
    parser.add_argument("--quick", action="store_true", help="K=1 checkpoint, N=64 rows, batch size 8")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="smoke test: hidden 64, 2 layers, vocab 8,192, K=1, N=16")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="where the models, eval set and JSON go")
    args = parser.parse_args(argv)
    return Plan(
        device=args.device,
        dtype="bfloat16" if torch.device(args.device).type == "cuda" else "float32",
        shape_name="tiny" if args.tiny else "qwen2-0.5b",
        shape=TINY_SHAPE if args.tiny else QWEN2_05B_SHAPE,
        vocab_size=TINY_VOCAB if args.tiny else shared.QWEN2_VOCAB,
        checkpoints=1 if args.quick or args.tiny else 2,
        rows=16 if args.tiny else 64 if args.quick else 512,
        batch_sizes=args.batch_sizes or ((8,) if args.quick else (4, 8, 16)),
        workdir=args.workdir.resolve(),
    )


def refuse_missing_cuda(device: str) -> None:
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        sys.exit(
            f"bench_gpu: --device {device}, but CUDA is unavailable (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda or 'none'}). Run it on a GPU machine, "
            "or smoke-test with --device cpu --tiny."
        )


def main(argv: Sequence[str] | None = None) -> None:
    plan = parse_args(argv)
    refuse_missing_cuda(plan.device)
    shared.quiet_libraries()
    started = time.perf_counter()
    measured_with = versions(plan.device)  # imports TRL now: a missing package fails before minutes of building
    print(", ".join(f"{name} {value}" for name, value in measured_with.items()), flush=True)
    plan.workdir.mkdir(parents=True, exist_ok=True)
    print(f"workdir {plan.workdir}: building or reusing the run ...", flush=True)
    workload = build_workload(plan)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-", dir=plan.workdir) as scratch:
        measurements, parities = measure(plan, workload, Path(scratch))
    free_memory()
    print("gpu-marked tests ...", flush=True)
    tests = run_gpu_tests()
    report = "\n\n".join(
        [
            format_header(plan, workload, measured_with),
            format_table(table_rows(measurements)),
            format_parity(parities),
            format_tests(tests),
        ]
    )
    output = plan.workdir / f"results_{plan.shape_name}_k{plan.checkpoints}_n{plan.rows}.json"
    record = results_record(plan, workload, measured_with, measurements, parities, tests)
    output.write_text(json.dumps({**record, "wall_s": time.perf_counter() - started}, indent=2))
    print()
    print(report)
    print(f"\nwrote {output} ({time.perf_counter() - started:.0f}s in all)")


if __name__ == "__main__":
    main()
