"""Whole-process benchmark: what a CI job pays for pytest-dpo, against TRL 1.16 and a lower bound.

    python benchmarks/bench_ci.py [--shape backbone|head|both] [--checkpoints 4] [--rows 256] [--workdir DIR]
                                  [--threads N] [--quick]

`bench_evaluate.py` times functions inside one warm process. Here every
contestant is a fresh process, timed from outside (interpreter start, imports,
model loading and exit included), with that process's peak RSS:

  - pytest-dpo cold: the `pytest` command a user types (one test using `dpo_result`), an empty score cache;
  - pytest-dpo warm: the same command again on the same cache (every score cached);
  - TRL: a script that builds `DPOTrainer(model=checkpoint, ref_model=base, ...)` per checkpoint and calls
    `evaluate()`;
  - lower bound: a script importing only torch, safetensors and the transformers model class, fed token ids the
    benchmark precomputed, doing the work no evaluator can skip (see `BOUND_SCRIPT`).

Settings for all of them: beta 0.1, sigmoid, max_length 1024, batch size 8, fp32, CPU. Each shape's workload
(built once from config, no download, under `<workdir>/<shape>/`) is a random-init Qwen2 base, K perturbed
`checkpoint-N` folders and an eval set of N standard rows (prompts ~20-120 tokens, completions ~10-80):

  - backbone: hidden 256, 4 layers, 4 heads (2 KV heads), intermediate 1024, vocab 8,192 (real LLM proportions);
  - head: Qwen2's real vocabulary (151,936) on a small backbone (hidden 64, 2 layers): the LM head dominates.

Before timing, each contestant runs once on one checkpoint and one batch of rows (bytecode, file cache). After
timing, untimed: a warm run with `--dpo-report` gives pytest-dpo's numbers for parity with TRL's (accuracies
may differ only by rows whose margin is a rounding-level tie), and a cold run with a probe plugin
(`-p bench_ci_probe`) splits the cold time into load, tokenize, backbone, LM head and overhead, next to the lower
bound's own split. Last, the plugin's import cost. It prints a table with the targets and writes the numbers as
JSON into the workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_evaluate as shared  # noqa: E402  (sets the offline environment, puts the repo on sys.path)
import torch  # noqa: E402

from pytest_dpo.evalset import load_eval_set  # noqa: E402
from pytest_dpo.metric_table import PER_EXAMPLE_METRICS  # noqa: E402
from pytest_dpo.packing import packed_length  # noqa: E402
from pytest_dpo.scoring import (  # noqa: E402
    PACKING_CHECK_ROWS,
    _batches_by_length,
    _right_padded,
    sequence_pair,
)
from pytest_dpo.tokenization import TokenizedRow, tokenize_eval_set  # noqa: E402

SETTINGS = shared.SETTINGS
DEFAULT_WORKDIR = shared.DEFAULT_WORKDIR / "ci"
PROMPT_TOKENS = (20, 120)
COMPLETION_TOKENS = (10, 80)
WARMUP_ROWS = SETTINGS.batch_size
IMPORT_RUNS = 3
# Other processes on a 2-core machine slow torch's threads down many times over; above this, say so.
BUSY_CORES = 0.2
# Per checkpoint, pytest-dpo's and TRL's numbers agree to this, relative to max(|TRL's value|, PARITY_FLOOR).
PARITY_RELATIVE = 1e-4
PARITY_FLOOR = 0.1
TIE_MARGIN = shared.TIE_MARGIN
# The metrics that are means of per-example arrays, which both contestants report alike (TRL per batch is replayed).
PARITY_METRICS = PER_EXAMPLE_METRICS
# Elements of the lower bound's reused logits buffer (128 MiB fp32): ~220 tokens per chunk with Qwen2's vocab.
BOUND_HEAD_ELEMENTS = 1 << 25
PROBE_MODULE = "bench_ci_probe"
# pytest plugins of our dev dependencies, absent where a team installs pytest-dpo (see `contestant_env`).
DEV_ONLY_PLUGINS = "-p no:hypothesispytest"
SCORE_CACHE_LINE = re.compile(r"score cache: (\d+) hits?, (\d+) miss")


@dataclass(frozen=True)
class Shape:
    """A workload's model: its Qwen2 config fields, vocabulary and the targets the contestants are held to."""

    name: str
    model: dict[str, int]
    vocab_size: int
    targets: dict[str, float]


SHAPES = {
    "backbone": Shape(
        "backbone",
        {
            "hidden_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 1024,
        },
        8192,
        {"cold/TRL": 0.18, "cold/bound": 1.15, "warm/TRL": 0.012, "warm seconds": 1.5, "peak RSS cold/TRL": 1.0},
    ),
    "head": Shape(
        "head",
        {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 256,
        },
        shared.QWEN2_VOCAB,
        {"cold/TRL": 0.05},
    ),
}
RATIOS = ("cold/TRL", "cold/bound", "warm/TRL", "warm seconds", "peak RSS cold/TRL")


# --------------------------------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One shape's models and eval set on disk; `tokens_file` holds the lower bound's precomputed batches."""

    shape: Shape
    base: Path
    checkpoints: list[Path]
    eval_file: Path
    tokens_file: Path
    parameters: int
    sequence_lengths: list[int]
    backbone_positions: dict[str, int]

    @property
    def models(self) -> list[Path]:
        """The K+1 models every contestant must score: the reference, then the checkpoints."""
        return [self.base, *self.checkpoints]

    @property
    def rows(self) -> int:
        return len(self.sequence_lengths) // 2


def build_workload(shape: Shape, folder: Path, checkpoints: int, rows: int) -> Workload:
    """The base, K checkpoints and the eval set, each reused when already in `folder`; its token batches."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(shared.TOKENIZER_DIR))
    # As in bench_evaluate: pad = EOS keeps the fixture tokenizer at its own size next to a Qwen2 config.
    tokenizer.pad_token = tokenizer.eos_token
    base = folder / "base"
    manifest = {
        "model": shape.model,
        "vocab_size": shape.vocab_size,
        "noise": shared.CHECKPOINT_NOISE,
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": COMPLETION_TOKENS,
        "seed": shared.DATA_SEED,
        "format": 1,
    }
    if shared._read_json(folder / "manifest.json") != json.loads(json.dumps(manifest)) or not base.exists():
        _clear(folder)
        shared.save_model(shared.new_base_model(tokenizer, shape.vocab_size, shape.model), tokenizer, base)
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    run = folder / "run"
    paths = [shared.ensure_checkpoint(base, tokenizer, run / f"checkpoint-{k}", k) for k in range(1, checkpoints + 1)]
    eval_file = folder / f"eval_{rows}.jsonl"
    if not eval_file.exists():
        # Lengths are counted with the tokenizer the contestants load from the model folders.
        shared.write_jsonl(eval_file, make_eval_rows(rows, AutoTokenizer.from_pretrained(str(base))))
    model = shared.load_causal_lm(str(base), device="cpu", dtype=torch.float32)
    return with_tokens(shape, base, paths, eval_file, sum(p.numel() for p in model.parameters()))


def with_tokens(shape: Shape, base: Path, checkpoints: list[Path], eval_file: Path, parameters: int) -> Workload:
    """The workload with its eval set tokenized as pytest-dpo does, the lower bound's batches written next to it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    tokenized = tokenize_eval_set(load_eval_set(eval_file), tokenizer, SETTINGS.max_length, SETTINGS.truncation_mode)
    if tokenized.dropped_rows or any(row.length(SETTINGS.max_length) < row.length() for row in tokenized.rows):
        raise ValueError(f"{eval_file}: rows dropped or truncated; the lower bound scores whole rows only.")
    batches = bound_batches(tokenized.rows)
    tokens_file = eval_file.with_suffix(".tokens.pt")
    torch.save(batches, tokens_file)
    rows = tokenized.rows
    lengths = [len(row.prompt_ids) + len(ids) for row in rows for ids in (row.chosen_ids, row.rejected_ids)]
    positions = {
        "tokens (prompts once)": sum(len(row.prompt_ids) + len(row.chosen_ids) + len(row.rejected_ids) for row in rows),
        "lower bound": sum(batch["ids"].numel() for part in batches.values() for batch in part),
        "pytest-dpo": packed_positions(rows),
        "TRL": shared.padded_tokens(tokenized, sort=False),
    }
    return Workload(shape, base, checkpoints, eval_file, tokens_file, parameters, lengths, positions)


def _clear(folder: Path) -> None:
    """Remove a workload built with other settings: its models, eval sets and token batches."""
    for stale in (folder / "base", folder / "run"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in [*folder.glob("eval_*.jsonl"), *folder.glob("eval_*.tokens.pt")]:
        stale.unlink()


def make_eval_rows(count: int, tokenizer: Any) -> list[dict[str, str]]:
    """`count` standard rows: a prompt of PROMPT_TOKENS, each completion COMPLETION_TOKENS."""
    return shared.rows_of_lengths(count, tokenizer, PROMPT_TOKENS, COMPLETION_TOKENS)


def bound_batches(rows: Sequence[TokenizedRow]) -> dict[str, list[dict[str, torch.Tensor]]]:
    """The lower bound's input, padded as little as batching allows: the prompts sorted by length in batches of
    `batch_size` rows, and apart from them all 2N completions sorted by length in batches of 2 x `batch_size`, each
    with its row and side (0 chosen, 1 rejected); the bound gathers each completion's prompt KV cache by row."""
    size = SETTINGS.batch_size
    by_prompt = sorted(range(len(rows)), key=lambda i: len(rows[i].prompt_ids))
    sequences = [(i, side) for i in range(len(rows)) for side in (0, 1)]
    sequences.sort(key=lambda sequence: len(_completion(rows, *sequence)))
    prompts = [_padded({"rows": part}, [rows[i].prompt_ids for i in part]) for part in _chunks(by_prompt, size)]
    completions = [
        _padded({"rows": [i for i, _ in part], "sides": [s for _, s in part]}, [_completion(rows, *s) for s in part])
        for part in _chunks(sequences, 2 * size)
    ]
    return {"prompts": prompts, "completions": completions}


def _completion(rows: Sequence[TokenizedRow], row: int, side: int) -> list[int]:
    return rows[row].rejected_ids if side else rows[row].chosen_ids


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def _padded(indices: Mapping[str, Sequence[int]], sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-padded `ids` and their `mask`, with the given index lists as tensors."""
    ids, mask = _right_padded(sequences, torch.device("cpu"))
    return {"ids": ids, "mask": mask, **{name: torch.tensor(values) for name, values in indices.items()}}


def packed_positions(rows: Sequence[TokenizedRow]) -> int:
    """Positions pytest-dpo's backbone runs over: per batch of rows sorted by packed length, each row's prompt and
    both completions packed and padded to the batch's longest; plus the first batch's `PACKING_CHECK_ROWS`
    shortest rows once more on the KV-cache path (prompts padded to the longest, then both completions of each
    row to the longest completion), the check each model's packing gets."""
    pairs = [sequence_pair(row, SETTINGS.max_length, SETTINGS.truncation_mode) for row in rows]
    batches = list(_batches_by_length(pairs, SETTINGS.batch_size, list(rows)))
    packed = sum(len(batch) * max(packed_length(rows[i]) for i in batch) for batch in batches)
    first = batches[0][-PACKING_CHECK_ROWS:]
    prompts = max(len(rows[i].prompt_ids) for i in first)
    completions = max(len(ids) for i in first for ids in (rows[i].chosen_ids, rows[i].rejected_ids))
    return packed + len(first) * (prompts + 2 * completions)


def warmup_workload(workload: Workload) -> Workload:
    """One checkpoint and the first batch of rows: what every contestant runs once, untimed, before the timing."""
    eval_file = workload.eval_file.with_name("warmup.jsonl")
    lines = workload.eval_file.read_text(encoding="utf-8").splitlines(keepends=True)
    eval_file.write_text("".join(lines[:WARMUP_ROWS]), encoding="utf-8")
    return with_tokens(workload.shape, workload.base, workload.checkpoints[:1], eval_file, workload.parameters)


# --------------------------------------------------------------------------------------------------------------------
# The contestants' scripts, written into the workdir
# --------------------------------------------------------------------------------------------------------------------

TRL_SCRIPT = '''\
"""TRL 1.16's own evaluation of each checkpoint, as a TRL user runs it. Written and run by bench_ci.py.

    python trl_evaluate.py SPEC.json OUT.json

SPEC: {"base": dir, "checkpoints": [dir, ...], "eval_file": file.jsonl, "output_dir": dir, "config": DPOConfig kwargs}.
OUT: per checkpoint folder name, TRL's eval metrics (without the `eval_` prefix).
"""

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer


def evaluate(checkpoint: str, spec: dict, rows: list[dict]) -> dict[str, float]:
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32),
        ref_model=AutoModelForCausalLM.from_pretrained(spec["base"], dtype=torch.float32),
        args=DPOConfig(output_dir=spec["output_dir"], **spec["config"]),
        # TRL requires a train set; one row keeps its tokenization out of the way.
        train_dataset=Dataset.from_list(rows[:1]),
        eval_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(checkpoint),
    )
    metrics = trainer.evaluate()
    return {name.removeprefix("eval_"): value for name, value in metrics.items() if name.startswith("eval_")}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    rows = [json.loads(line) for line in Path(spec["eval_file"]).read_text(encoding="utf-8").splitlines() if line]
    results = {Path(path).name: evaluate(path, spec, rows) for path in spec["checkpoints"]}
    Path(sys.argv[2]).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
'''

BOUND_SCRIPT = '''\
"""The lower bound: the work no evaluator can skip. Written and run by bench_ci.py.

    python lower_bound.py TOKENS.pt OUT.json REFERENCE_DIR CHECKPOINT_DIR...

Imports torch, safetensors and the transformers model class, nothing else: no tokenizer (TOKENS.pt holds the
benchmark's batches of pytest-dpo's token ids), no config or metrics code. For each model it reads the weights
once (the first through `from_pretrained`, the others into the same modules) and runs the backbone over each
distinct token once, as little padding as batching allows: the prompts in batches sorted by prompt length,
keeping each row's KV cache, then all completions in batches sorted by completion length, each continuing from
its row's prompt cache. The LM head runs on completion positions only, in chunks written into one reused buffer
and reduced at once to the target tokens' log-probs. OUT: per model, the summed log-probs of the chosen and of
the rejected completions (`logps`), and the seconds spent loading, in the backbone and in the head (`seconds`).
"""

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import Qwen2ForCausalLM
from transformers.cache_utils import DynamicCache

HEAD_ELEMENTS = {head_elements}

Batch = dict[str, torch.Tensor]
# Per row: its prompt's (keys, values) per layer, and the hidden state of its last token.
PromptStates = dict[int, tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]]
SECONDS = {"load": 0.0, "backbone": 0.0, "head": 0.0}


@contextlib.contextmanager
def timed(key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        SECONDS[key] += time.perf_counter() - start


def prompt_states(model: Qwen2ForCausalLM, batches: list[Batch]) -> PromptStates:
    """Per row: its prompt's keys and values per layer (without padding) and the hidden state of its last token."""
    states = {}
    for batch in batches:
        out = model.model(input_ids=batch["ids"], attention_mask=batch["mask"], use_cache=True)
        layers = [(layer.keys, layer.values) for layer in out.cache.layers]
        for i, (row, length) in enumerate(zip(batch["rows"].tolist(), batch["mask"].sum(dim=1).tolist())):
            cache = [(keys[i, :, :length], values[i, :, :length]) for keys, values in layers]
            states[row] = (cache, out.last_hidden_state[i, length - 1])
    return states


def padded_stack(tensors: list[torch.Tensor], width: int) -> torch.Tensor:
    """(heads, length, dim) tensors right-padded to `width` and stacked."""
    heads, _, dim = tensors[0].shape
    out = torch.zeros(len(tensors), heads, width, dim)
    for i, tensor in enumerate(tensors):
        out[i, :, : tensor.shape[1]] = tensor
    return out


def predicting_hidden(model: Qwen2ForCausalLM, batch: Batch, states: PromptStates) -> torch.Tensor:
    """Per completion position, the hidden state that predicts its token: the prompt's last, then the completion's."""
    prompts = [states[row] for row in batch["rows"].tolist()]
    lengths = torch.tensor([layers[0][0].shape[1] for layers, _ in prompts])
    width = int(lengths.max())
    cache = DynamicCache(
        ddp_cache_data=[
            tuple(padded_stack([layers[layer][kind] for layers, _ in prompts], width) for kind in (0, 1))
            for layer in range(len(prompts[0][0]))
        ]
    )
    prompt_mask = (torch.arange(width) < lengths[:, None]).long()
    hidden = model.model(
        input_ids=batch["ids"],
        attention_mask=torch.cat([prompt_mask, batch["mask"]], dim=1),
        position_ids=lengths[:, None] + torch.arange(batch["ids"].shape[1]),
        cache=cache,
        use_cache=True,
    ).last_hidden_state
    last = torch.stack([hidden_state for _, hidden_state in prompts])
    return torch.cat([last.unsqueeze(1), hidden[:, :-1]], dim=1)


def token_logps(
    weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor, buffer: torch.Tensor
) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[target] per token, one buffer-sized chunk of logits at a time."""
    out = torch.empty(len(targets))
    for start in range(0, len(targets), len(buffer)):
        part = slice(start, start + len(buffer))
        logits = torch.matmul(hidden[part], weight.t(), out=buffer[: len(targets[part])])
        target = logits.gather(1, targets[part, None]).squeeze(1)
        top = logits.amax(dim=1)
        out[part] = target - top - logits.sub_(top[:, None]).exp_().sum(dim=1).log()
    return out


def completion_sums(model: Qwen2ForCausalLM, batches: dict[str, list[Batch]], buffer: torch.Tensor) -> list[float]:
    """Summed completion log-probs of the chosen and of the rejected sequences."""
    with timed("backbone"):
        states = prompt_states(model, batches["prompts"])
    sums = torch.zeros(2)
    for batch in batches["completions"]:
        mask = batch["mask"].bool()
        with timed("backbone"):
            hidden = predicting_hidden(model, batch, states)[mask]
        with timed("head"):
            logps = token_logps(model.lm_head.weight, hidden, batch["ids"][mask], buffer)
        sums.index_add_(0, batch["sides"][:, None].expand_as(mask)[mask], logps)
    return sums.tolist()


def main() -> None:
    batches = torch.load(sys.argv[1])
    folders = [Path(folder) for folder in sys.argv[3:]]
    with timed("load"):
        model = Qwen2ForCausalLM.from_pretrained(str(folders[0]), dtype=torch.float32).eval()
    vocab = model.lm_head.weight.shape[0]
    totals = {}
    with torch.inference_mode():
        buffer = torch.empty(max(1, HEAD_ELEMENTS // vocab), vocab)
        for index, folder in enumerate(folders):
            if index:
                with timed("load"):
                    model.load_state_dict(load_file(str(folder / "model.safetensors")), assign=True)
            totals[folder.name] = completion_sums(model, batches, buffer)
    Path(sys.argv[2]).write_text(json.dumps({"logps": totals, "seconds": SECONDS}))


if __name__ == "__main__":
    main()
'''.replace("{head_elements}", str(BOUND_HEAD_ELEMENTS))

PROBE_SCRIPT = '''\
"""Where a cold pytest-dpo run's time goes: a pytest plugin (`-p bench_ci_probe`) written by bench_ci.py.

Wraps, by module attribute, what `pytest_dpo.evaluation` calls to load models (`load_policy`, `load_reference`),
to tokenize (`tokenize_eval_set`) and to score (`score`), and inside scoring the LM head
(`pytest_dpo.scoring._completion_sums`) and the backbone (`Qwen2Model.forward`). Writes the seconds of each, its
own import time (torch, transformers' Qwen2, pytest_dpo.evaluation) and the moments it was loaded and pytest
finished (its last hook, after every other plugin's `pytest_unconfigure`) to $BENCH_CI_PROBE_OUT.
"""

import functools
import json
import os
import time

import pytest

LOADED_AT = time.time()
_start = time.perf_counter()
from pytest_dpo import evaluation, scoring  # noqa: E402
from transformers.models.qwen2 import modeling_qwen2  # noqa: E402

IMPORTS_S = time.perf_counter() - _start
SECONDS = {}


def _timed(owner, name, key):
    function = getattr(owner, name)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            SECONDS[key] = SECONDS.get(key, 0.0) + time.perf_counter() - start

    setattr(owner, name, wrapper)


for _owner, _name, _key in (
    (evaluation, "load_policy", "load"),
    (evaluation, "load_reference", "load"),
    (evaluation, "tokenize_eval_set", "tokenize"),
    (evaluation, "score", "scoring"),
    (scoring, "_completion_sums", "head"),
    (modeling_qwen2.Qwen2Model, "forward", "backbone"),
):
    _timed(_owner, _name, _key)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    record = {"loaded_at": LOADED_AT, "imports_s": IMPORTS_S, "finished_at": time.time(), "seconds": SECONDS}
    with open(os.environ["BENCH_CI_PROBE_OUT"], "w") as out:
        json.dump(record, out)
'''

TEST_FILE = '''\
def test_scored(dpo_result):
    assert dpo_result.metrics["loss"] > 0
'''


@dataclass(frozen=True)
class Scripts:
    """The generated files: the TRL and lower-bound scripts, the probe plugin's folder and the one-test suite."""

    trl: Path
    bound: Path
    probe_dir: Path
    test_dir: Path


def write_scripts(folder: Path) -> Scripts:
    """Write the contestants' scripts and the tiny test suite (with its own `pytest.ini`, so it is the rootdir)."""
    scripts = Scripts(folder / "trl_evaluate.py", folder / "lower_bound.py", folder / "probe", folder / "suite")
    scripts.probe_dir.mkdir(parents=True, exist_ok=True)
    scripts.test_dir.mkdir(parents=True, exist_ok=True)
    scripts.trl.write_text(TRL_SCRIPT)
    scripts.bound.write_text(BOUND_SCRIPT)
    (scripts.probe_dir / f"{PROBE_MODULE}.py").write_text(PROBE_SCRIPT)
    (scripts.test_dir / "pytest.ini").write_text("[pytest]\n")
    (scripts.test_dir / "test_release.py").write_text(TEST_FILE)
    return scripts


# --------------------------------------------------------------------------------------------------------------------
# Running a contestant
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """One process: wall seconds from fork to reaped, its peak RSS, when it started and ended, its output."""

    seconds: float
    peak_rss_mib: float
    started_at: float
    ended_at: float
    output: str


# Forks and execs the command, reaps it with wait4 and writes its wall time, ru_maxrss and exit code as JSON.
# Linux counts into a process's ru_maxrss the RSS of the process it was forked from, as it was at exec; forked
# from this small launcher rather than the benchmark (torch and models in memory), a contestant's peak is its own.
LAUNCHER = """
import json, os, sys, time
record, command = sys.argv[1], sys.argv[2:]
started_at, start = time.time(), time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execv(command[0], command)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - start
with open(record, "w") as out:
    json.dump({"seconds": seconds, "started_at": started_at, "ended_at": time.time(), "peak_rss_kib": usage.ru_maxrss,
               "exit_code": os.waitstatus_to_exitcode(status)}, out)
"""


def contestant_env(workdir: Path, threads: int | None) -> dict[str, str]:
    """The environment every contestant runs in: offline, bytecode cached (under the workdir, as an installed
    package has it) even where PYTHONDONTWRITEBYTECODE is set, no PYTEST_ADDOPTS or PYTHONPATH from the caller,
    and `threads` intra-op threads where given (torch's default: one per core).

    pytest runs without hypothesis's plugin, as in a team's environment after `pip install pytest-dpo` (hypothesis
    is only our dev dependency): in the benchmark's dev environment that plugin imports all of hypothesis at the
    end of every pytest run (~0.65 s here), which no user of pytest-dpo pays on its account."""
    dropped = ("PYTEST_ADDOPTS", "PYTHONDONTWRITEBYTECODE", "PYTHONPATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    env = {key: value for key, value in os.environ.items() if key not in dropped}
    env |= {"HF_HUB_OFFLINE": "1", "PYTHONPYCACHEPREFIX": str(workdir / "pycache"), "PYTEST_ADDOPTS": DEV_ONLY_PLUGINS}
    return env | ({} if threads is None else {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})


def run_process(
    command: Sequence[str], cwd: Path, env: Mapping[str, str], log: Path, ok_codes: tuple[int, ...] = (0,)
) -> Measured:
    """Run `command` alone through `LAUNCHER`, its output into `log`: its wall time and peak RSS."""
    log.parent.mkdir(parents=True, exist_ok=True)
    record_file = log.with_suffix(".process.json")
    with log.open("w") as out:
        launcher = [sys.executable, "-c", LAUNCHER, str(record_file), *command]
        subprocess.run(launcher, cwd=cwd, env=dict(env), stdout=out, stderr=subprocess.STDOUT, check=True)
    record = json.loads(record_file.read_text())
    output = log.read_text(errors="replace")
    if record["exit_code"] not in ok_codes:
        tail = "\n".join(output.splitlines()[-40:])
        raise RuntimeError(f"exit status {record['exit_code']}: {' '.join(command)}\n(log: {log})\n{tail}")
    return Measured(record["seconds"], record["peak_rss_kib"] / 1024, record["started_at"], record["ended_at"], output)


def pytest_command(workload: Workload, scripts: Scripts, cache_dir: Path, *extra: str) -> list[str]:
    """The pytest-dpo command line a user types, settings spelled out."""
    return [
        sys.executable,
        "-m",
        "pytest",
        str(scripts.test_dir),
        *(f"--dpo-checkpoint={path}" for path in workload.checkpoints),
        f"--dpo-reference={workload.base}",
        f"--dpo-eval-set={workload.eval_file}",
        f"--dpo-batch-size={SETTINGS.batch_size}",
        f"--dpo-max-length={SETTINGS.max_length}",
        f"--dpo-beta={SETTINGS.beta}",
        f"--dpo-loss-type={','.join(SETTINGS.loss_type)}",
        f"--dpo-device={SETTINGS.device}",
        f"--dpo-dtype={SETTINGS.dtype}",
        f"--dpo-cache-dir={cache_dir}",
        "--dpo-lock=none",
        "-p",
        "no:cacheprovider",
        "-q",
        *extra,
    ]


def trl_command(workload: Workload, scripts: Scripts, scratch: Path) -> tuple[list[str], Path]:
    """The TRL script's command line (its spec written into `scratch`) and where it writes its metrics."""
    spec = {
        "base": str(workload.base),
        "checkpoints": [str(path) for path in workload.checkpoints],
        "eval_file": str(workload.eval_file),
        "output_dir": str(scratch / "trl-output"),
        "config": shared.trl_config_kwargs(),
    }
    spec_file, out = scratch / "trl_spec.json", scratch / "trl_metrics.json"
    scratch.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(spec, indent=2))
    return [sys.executable, str(scripts.trl), str(spec_file), str(out)], out


def bound_command(workload: Workload, scripts: Scripts, scratch: Path) -> tuple[list[str], Path]:
    """The lower bound's command line and where it writes its log-prob sums."""
    out = scratch / "bound_logps.json"
    return [sys.executable, str(scripts.bound), str(workload.tokens_file), str(out), *map(str, workload.models)], out


def cache_counts(output: str) -> tuple[int, int] | None:
    """(hits, misses) from the plugin's `score cache: ...` summary line, None without one."""
    found = SCORE_CACHE_LINE.search(output)
    return None if found is None else (int(found.group(1)), int(found.group(2)))


# --------------------------------------------------------------------------------------------------------------------
# One shape
# --------------------------------------------------------------------------------------------------------------------


def warm_up(workload: Workload, scripts: Scripts, env: Mapping[str, str], scratch: Path) -> None:
    """Every contestant once on one checkpoint and one batch, untimed: bytecode compiled, files in the page cache,
    and a broken contestant found before the long runs."""
    small = warmup_workload(workload)
    trl, _ = trl_command(small, scripts, scratch)
    bound, _ = bound_command(small, scripts, scratch)
    dpo = pytest_command(small, scripts, scratch / "cache")
    for name, command in (("trl", trl), ("bound", bound), ("pytest-dpo", dpo)):
        run_process(command, scripts.test_dir, env, scratch / "logs" / f"{name}.log")


def measure_shape(workload: Workload, scripts: Scripts, env: Mapping[str, str], scratch: Path) -> dict[str, Any]:
    """The timed contestants (cold, warm, TRL, bound), then the untimed parity and breakdown runs."""
    logs = scratch / "logs"
    cache = scratch / "cache"
    print(f"  [{workload.shape.name}] pytest-dpo cold ...", flush=True)
    cold = run_process(pytest_command(workload, scripts, cache), scripts.test_dir, env, logs / "cold.log")
    print(f"  [{workload.shape.name}] pytest-dpo warm ...", flush=True)
    warm = run_process(pytest_command(workload, scripts, cache), scripts.test_dir, env, logs / "warm.log")
    print(f"  [{workload.shape.name}] TRL ...", flush=True)
    command, trl_out = trl_command(workload, scripts, scratch)
    trl = run_process(command, scripts.test_dir, env, logs / "trl.log")
    print(f"  [{workload.shape.name}] lower bound ...", flush=True)
    command, bound_out = bound_command(workload, scripts, scratch)
    bound = run_process(command, scripts.test_dir, env, logs / "bound.log")
    print(f"  [{workload.shape.name}] parity report and cold-run breakdown (untimed) ...", flush=True)
    ours, tie_rows = pytest_dpo_metrics(workload, scripts, env, scratch, cache)
    trl_metrics = json.loads(trl_out.read_text())
    bound_record = json.loads(bound_out.read_text())
    return {
        "contestants": {
            "pytest-dpo cold": _record(cold),
            "pytest-dpo warm": _record(warm),
            "TRL": _record(trl),
            "lower bound": _record(bound),
        },
        "parity": parity(ours, trl_metrics, tie_rows, workload.rows),
        "bound_check": bound_check(ours, bound_record["logps"], workload.rows),
        "breakdown": cold_breakdown(workload, scripts, env, scratch),
        "bound_breakdown": bound_breakdown(bound_record["seconds"], bound.seconds),
        "metrics": {"pytest-dpo": ours, "TRL": trl_metrics},
    }


def _record(measured: Measured) -> dict[str, Any]:
    counts = cache_counts(measured.output)
    return {
        "seconds": measured.seconds,
        "peak_rss_mib": measured.peak_rss_mib,
        "score_cache": None if counts is None else {"hits": counts[0], "misses": counts[1]},
    }


def pytest_dpo_metrics(
    workload: Workload, scripts: Scripts, env: Mapping[str, str], scratch: Path, cache: Path
) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """pytest-dpo's metrics per checkpoint, from the report of one more run on the (warm) score cache, and per
    checkpoint the rows whose reward margin is within fp32 rounding of a tie (|margin| < TIE_MARGIN)."""
    report_dir = scratch / "report"
    command = pytest_command(workload, scripts, cache, f"--dpo-report={report_dir}")
    run_process(command, scripts.test_dir, env, scratch / "logs" / "report.log")
    report = json.loads((report_dir / "dpo_report.json").read_text())
    per_example = json.loads((report_dir / "dpo_per_example.json").read_text())
    tie_rows = {name: sum(abs(margin) < TIE_MARGIN for margin in rows["margins"]) for name, rows in per_example.items()}
    return {entry["id"]: entry["metrics"] for entry in report["checkpoints"]}, tie_rows


def cold_breakdown(workload: Workload, scripts: Scripts, env: Mapping[str, str], scratch: Path) -> dict[str, float]:
    """A second cold run with the probe plugin: seconds of each step; overhead is the process's time minus load,
    tokenize, backbone and LM head (startup, imports, the rest of scoring, pytest and exit)."""
    probe_out = scratch / "probe.json"
    probe_env = {**env, "PYTHONPATH": str(scripts.probe_dir), "BENCH_CI_PROBE_OUT": str(probe_out)}
    command = pytest_command(workload, scripts, scratch / "probe-cache", "-p", PROBE_MODULE)
    measured = run_process(command, scripts.test_dir, probe_env, scratch / "logs" / "probe.log")
    return breakdown_of(json.loads(probe_out.read_text()), measured)


def breakdown_of(probe: Mapping[str, Any], measured: Measured) -> dict[str, float]:
    """The probe's record as the breakdown's rows (see `cold_breakdown`); the parts of overhead are its other rows."""
    seconds = probe["seconds"]
    load, tokenize = seconds.get("load", 0.0), seconds.get("tokenize", 0.0)
    backbone, head, scoring = seconds.get("backbone", 0.0), seconds.get("head", 0.0), seconds.get("scoring", 0.0)
    startup = probe["loaded_at"] - measured.started_at
    exit_s = measured.ended_at - probe["finished_at"]
    inside = probe["finished_at"] - probe["loaded_at"] - probe["imports_s"]
    return {
        "total": measured.seconds,
        "load": load,
        "tokenize": tokenize,
        "backbone": backbone,
        "head": head,
        "overhead": measured.seconds - load - tokenize - backbone - head,
        "startup (python, pytest, plugins)": startup,
        "imports (torch, transformers, pytest_dpo.evaluation)": probe["imports_s"],
        "scoring besides backbone and head": scoring - backbone - head,
        "pytest, metrics, cache, report": inside - load - tokenize - scoring,
        "exit": exit_s,
    }


def bound_breakdown(seconds: Mapping[str, float], total: float) -> dict[str, float]:
    """The lower bound's own split of its (timed) run, in the breakdown's rows; overhead is the rest: interpreter
    start, imports, reading the token batches, exit."""
    work = {name: seconds[name] for name in ("load", "backbone", "head")}
    return {"total": total, **work, "overhead": total - sum(work.values())}


def parity(
    ours: Mapping[str, Mapping[str, float]],
    trl: Mapping[str, Mapping[str, float]],
    tie_rows: Mapping[str, int],
    rows: int,
) -> dict[str, Any]:
    """Per checkpoint and PARITY_METRICS, |ours - TRL's| / max(|TRL's|, PARITY_FLOOR): the largest, and whether all
    are within PARITY_RELATIVE. A row whose margin is within rounding of 0 (`tie_rows`) is a coin flip in fp32, so
    `rewards/accuracies` may also differ by up to that many rows in N (`excused`)."""
    differences = {
        f"{name} {metric}": abs(ours[name][metric] - trl[name][metric]) / max(abs(trl[name][metric]), PARITY_FLOOR)
        for name in trl
        for metric in PARITY_METRICS
    }
    accuracy = "rewards/accuracies"
    flipped = {name: round(abs(ours[name][accuracy] - trl[name][accuracy]) * rows) for name in trl}
    excused = {
        f"{name} {accuracy}": count
        for name, count in flipped.items()
        if differences[f"{name} {accuracy}"] > PARITY_RELATIVE and count <= tie_rows.get(name, 0)
    }
    judged = {key: value for key, value in differences.items() if key not in excused}
    worst = max(judged, key=judged.__getitem__)
    return {
        "max_relative": judged[worst],
        "worst": worst,
        "match": judged[worst] <= PARITY_RELATIVE and set(ours) == set(trl),
        "excused_rows": excused,
        "tie_rows": dict(tie_rows),
        "differences": differences,
    }


def bound_check(ours: Mapping[str, Mapping[str, float]], bound: Mapping[str, list[float]], rows: int) -> dict[str, Any]:
    """Whether the lower bound computed the same log-probs: its summed chosen and rejected log-probs of each
    checkpoint against pytest-dpo's `logps/chosen` and `logps/rejected` means times the row count."""
    differences = {
        f"{name} {side}": abs(total - rows * ours[name][f"logps/{side}"]) / max(abs(total), PARITY_FLOOR)
        for name in ours
        for side, total in zip(("chosen", "rejected"), bound[name])
    }
    worst = max(differences, key=differences.__getitem__)
    return {"max_relative": differences[worst], "worst": worst, "match": differences[worst] <= PARITY_RELATIVE}


def ratios(contestants: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The figures the targets judge, from each contestant's seconds and peak RSS."""
    seconds = {name: record["seconds"] for name, record in contestants.items()}
    return {
        "cold/TRL": seconds["pytest-dpo cold"] / seconds["TRL"],
        "cold/bound": seconds["pytest-dpo cold"] / seconds["lower bound"],
        "warm/TRL": seconds["pytest-dpo warm"] / seconds["TRL"],
        "warm seconds": seconds["pytest-dpo warm"],
        "peak RSS cold/TRL": contestants["pytest-dpo cold"]["peak_rss_mib"] / contestants["TRL"]["peak_rss_mib"],
    }


def verdicts(figures: Mapping[str, float], targets: Mapping[str, float]) -> dict[str, bool]:
    """Per target, whether its figure is at most the target."""
    return {name: figures[name] <= target for name, target in targets.items()}


# --------------------------------------------------------------------------------------------------------------------
# Import cost
# --------------------------------------------------------------------------------------------------------------------


def import_costs(env: Mapping[str, str], folder: Path, runs: int = IMPORT_RUNS) -> dict[str, float]:
    """Medians of `runs` interleaved runs (ms): the bare interpreter, `import pytest_dpo.plugin`, and `pytest --co`
    on an empty folder with and without the plugin."""
    empty = folder / "empty"
    empty.mkdir(parents=True, exist_ok=True)
    (empty / "pytest.ini").write_text("[pytest]\n")
    collect = [sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", str(empty)]
    with_plugin, without_plugin = "pytest --co (empty folder)", "pytest --co -p no:dpo (empty folder)"
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import pytest_dpo.plugin'": [sys.executable, "-c", "import pytest_dpo.plugin"],
        with_plugin: collect,
        without_plugin: [*collect, "-p", "no:dpo"],
    }
    switch = {"with_plugin": commands[with_plugin], "without_plugin": commands[without_plugin]}
    shared._check_plugin_switch(switch, str(empty), dict(env))
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs + 1):  # the first round only warms the file cache and bytecode
        for name, command in commands.items():
            # pytest exits with 5 when it collects nothing.
            samples[name].append(run_process(command, empty, env, folder / "import.log", ok_codes=(0, 5)).seconds)
    medians = {name: statistics.median(values[1:]) * 1000 for name, values in samples.items()}
    medians["plugin overhead on pytest --co"] = medians[with_plugin] - medians[without_plugin]
    return medians


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------

MARK = {True: "✓", False: "✗"}


def render(summary: Mapping[str, Any]) -> str:
    """The whole report: machine and load, then each shape's table, breakdown and parity, then import costs."""
    machine = summary["machine"]
    busy, versions = machine["other_processes_busy_cores"], machine["versions"]
    lines = [
        f"{machine['cpus']} CPUs, {machine['threads']} torch threads per contestant; torch {versions['torch']}, "
        f"transformers {versions['transformers']}, trl {versions['trl']}; pytest_dpo at {machine['pytest_dpo_commit']}",
        f"load average before {_loadavg(machine['loadavg_before'])}, after {_loadavg(machine['loadavg_after'])}; "
        f"cores kept busy by other processes while measuring: {busy:.2f}"
        + ("" if busy <= BUSY_CORES else "  !! timings not reliable"),
    ]
    for record in summary["shapes"].values():
        lines += ["", *render_shape(record)]
    lines += ["", f"import cost (ms, median of {IMPORT_RUNS}):"]
    lines += [f"  {name:44s}{value:8.0f}" for name, value in summary["import_ms"].items()]
    return "\n".join(lines)


def _loadavg(values: Sequence[float]) -> str:
    return " ".join(f"{value:.2f}" for value in values)


def render_shape(record: Mapping[str, Any]) -> list[str]:
    """One shape's table of seconds and peak RSS, ratios against targets, breakdown, parity and bound check."""
    workload, contestants, figures = record["workload"], record["contestants"], record["ratios"]
    targets, met = record["targets"], record["met"]
    lengths = workload["sequence_tokens"]
    lines = [
        f"shape {record['shape']}: Qwen2 {workload['parameters'] / 1e6:.2f}M params ({_shape_text(workload['model'])}, "
        f"vocab {workload['vocab_size']:,}), K={workload['checkpoints']} checkpoints, N={workload['rows']} rows, "
        f"sequences {lengths['min']}-{lengths['max']} tokens (median {lengths['median']:g})",
        f"{'':34s}{'seconds':>9s}{'peak RSS MiB':>14s}  score cache",
    ]
    for name, result in contestants.items():
        cache = result["score_cache"]
        cached = "" if cache is None else f"  {cache['hits']} hits, {cache['misses']} misses"
        lines.append(f"{name:34s}{result['seconds']:9.2f}{result['peak_rss_mib']:14.0f}{cached}")
    lines += ["", f"{'ratio':34s}{'value':>9s}{'target':>10s}  met"]
    for name in RATIOS:
        target = f"<= {targets[name]:g}" if name in targets else "—"
        lines.append(f"{name:34s}{figures[name]:9.3f}{target:>10s}  {MARK[met[name]] if name in met else ''}")
    if figures["cold/bound"] < 1:
        lines.append("!! pytest-dpo cold beat the lower bound: the bound is wrong (it does avoidable work)")
    positions = ", ".join(f"{name} {count:,}" for name, count in workload["backbone_positions_per_model"].items())
    lines += [f"positions through the backbone per model: {positions}"]
    lines += [
        "",
        "where cold time goes (seconds; pytest-dpo: a second, instrumented cold run; the bound: its timed run):",
        *render_breakdown(record["breakdown"], record["bound_breakdown"]),
    ]
    agree, check = record["parity"], record["bound_check"]
    lines += [
        "",
        f"parity with TRL {MARK[agree['match']]}: {', '.join(PARITY_METRICS)} per checkpoint, max relative "
        f"difference {agree['max_relative']:.1e} ({agree['worst']}; tolerance {PARITY_RELATIVE:g} of "
        f"max(|TRL|, {PARITY_FLOOR:g}))",
        *(
            f"  {key}: {count} row(s) decided the other way, within the {agree['tie_rows'][key.split()[0]]} row(s) "
            f"whose |margin| < {TIE_MARGIN:g} (fp32 rounding of a tie)"
            for key, count in agree["excused_rows"].items()
        ),
        f"lower bound computes the same log-probs {MARK[check['match']]}: max relative difference "
        f"{check['max_relative']:.1e} ({check['worst']})",
    ]
    return lines


def _shape_text(model: Mapping[str, int]) -> str:
    return (
        f"hidden {model['hidden_size']}, {model['num_hidden_layers']} layers, {model['num_attention_heads']} heads "
        f"({model['num_key_value_heads']} KV), intermediate {model['intermediate_size']}"
    )


BREAKDOWN_WORK = ("total", "load", "tokenize", "backbone", "head", "overhead")


def render_breakdown(breakdown: Mapping[str, float], bound: Mapping[str, float]) -> list[str]:
    """The breakdown's rows next to the lower bound's: total, the kinds of work, overhead, then overhead's parts
    (pytest-dpo's only) indented."""
    lines = [f"  {'':54s}{'pytest-dpo':>16s}{'lower bound':>17s}"]
    for name, seconds in breakdown.items():
        indent = "  " if name in BREAKDOWN_WORK else "    "
        ours = f"{seconds:8.2f} {100 * seconds / breakdown['total']:5.1f}%"
        theirs = f"{bound[name]:8.2f} {100 * bound[name] / bound['total']:5.1f}%" if name in bound else ""
        lines.append(f"{indent}{name:<{56 - len(indent)}s}{ours:>14s}   {theirs:>14s}")
    return lines


def summarise_shape(workload: Workload, measured: Mapping[str, Any]) -> dict[str, Any]:
    """One shape's JSON record: the workload, the measurements, the ratios and which targets are met."""
    lengths = workload.sequence_lengths
    figures = ratios(measured["contestants"])
    return {
        "shape": workload.shape.name,
        "workload": {
            "model": workload.shape.model,
            "vocab_size": workload.shape.vocab_size,
            "parameters": workload.parameters,
            "checkpoints": len(workload.checkpoints),
            "rows": workload.rows,
            "sequence_tokens": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)},
            "backbone_positions_per_model": workload.backbone_positions,
            "folder": str(workload.base.parent),
        },
        **measured,
        "ratios": figures,
        "targets": workload.shape.targets,
        "met": verdicts(figures, workload.shape.targets),
    }


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("backbone", "head", "both"), default="both", help="which workload(s)")
    parser.add_argument("--checkpoints", type=int, default=None, help="K checkpoints (default 4; --quick: 2)")
    parser.add_argument("--rows", type=int, default=None, help="N eval rows (default 256; --quick: 32)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="where workloads, scripts and JSON go")
    parser.add_argument("--quick", action="store_true", help="smoke run: K=2, N=32")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads of every contestant (OMP_NUM_THREADS; default: torch's, one per core). On a machine "
        "other jobs keep busy, 1 keeps a descheduled thread from stalling the others",
    )
    args = parser.parse_args(argv)
    args.checkpoints = args.checkpoints or (2 if args.quick else 4)
    args.rows = args.rows or (32 if args.quick else 256)
    if args.rows % SETTINGS.batch_size:
        parser.error(
            f"--rows {args.rows}: use a multiple of the batch size ({SETTINGS.batch_size}); TRL averages batch means, "
            "which equal whole-set means (what parity compares) only when every batch is full."
        )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    shared.quiet_libraries()
    workdir = args.workdir.resolve()
    names = ("backbone", "head") if args.shape == "both" else (args.shape,)
    started = time.perf_counter()
    env = contestant_env(workdir, args.threads)
    scripts = write_scripts(workdir / "scripts")
    workloads, scratches = {}, {}
    for name in names:
        print(f"{name}: building or reusing the workload in {workdir / name} ...", flush=True)
        workloads[name] = build_workload(SHAPES[name], workdir / name, args.checkpoints, args.rows)
        scratches[name] = fresh_scratch(workdir / name / f"scratch_k{args.checkpoints}_n{args.rows}")
        print(f"{name}: warming up every contestant on one checkpoint and {WARMUP_ROWS} rows ...", flush=True)
        warm_up(workloads[name], scripts, env, scratches[name] / "warmup")
    load: dict[str, float] = {}
    loadavg_before = os.getloadavg()
    measured = {}
    with shared.other_processes_load(load):
        for name, workload in workloads.items():
            print(f"{name}: measuring ...", flush=True)
            measured[name] = summarise_shape(workload, measure_shape(workload, scripts, env, scratches[name]))
        print("import cost ...", flush=True)
        imports = import_costs(env, workdir / "imports")
    summary = {
        "machine": {
            "cpus": os.cpu_count(),
            "threads": args.threads or os.cpu_count(),
            "loadavg_before": loadavg_before,
            "loadavg_after": os.getloadavg(),
            "other_processes_busy_cores": load["cores"],
            "versions": shared._versions(),
            "pytest_dpo_commit": shared._git_describe(),
        },
        "settings": {**SETTINGS.to_dict(), "checkpoints": args.checkpoints, "rows": args.rows},
        "shapes": measured,
        "import_ms": imports,
        "benchmark_wall_s": time.perf_counter() - started,
    }
    output = workdir / f"results_{args.shape}_k{args.checkpoints}_n{args.rows}.json"
    output.write_text(json.dumps(summary, indent=2, default=str))
    print()
    print(render(summary))
    print(f"\nwrote {output} ({summary['benchmark_wall_s']:.0f} s in all)")


def fresh_scratch(folder: Path) -> Path:
    """An empty scratch folder (score caches, logs, outputs) for this run."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


if __name__ == "__main__":
    main()
