"""Bad input, one table: every row is a real run that must stop with a message naming the place and the fix.

Each `Case` writes its broken input into a fresh folder and returns what to run: a pytest session with
the plugin (`PluginRun`, which expects a usage error or a failed run) or a call of the public API
(`ApiCall`, which expects an exception). The row passes only if the message contains both `where` (the
file, line, row, field or option at fault) and `fix` (what to do), and nothing was published: the local
save dir stays empty and no release commit reaches the Hub. The one row whose input turns out to be fine
(a tokenizer without a pad token: TRL needs none for scoring) checks that the checkpoint is published.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import shutil
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import huggingface_hub  # noqa: F401
import peft  # noqa: F401
import pyarrow  # noqa: F401
import pytest
import torch
import transformers  # noqa: F401
from safetensors.torch import load_file, save_file

from pytest_dpo import assert_margin_positive, evaluate, publish
from pytest_dpo.checkpoints import discover_checkpoints
from pytest_dpo.evalset import load_eval_set
from pytest_dpo.options import ALL_OPTIONS
from pytest_dpo.report import (
    build_report,
    eval_set_record,
    per_example_of,
    report_entry,
)
from pytest_dpo.report_files import write_report
from pytest_dpo.verdicts import Verdicts

from .fixture_paths import BASE, EVAL_CONVERSATIONAL, EVAL_STANDARD, FULL_RUN, LORA_RUN
from .hub_server import HubServer, hub_environment
from .sharding import shard

pytest_plugins = ["pytester"]
# The heavy libraries above are imported before any in-process pytester run (see tests/test_plugin.py).
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>'.*:DeprecationWarning")

TOKEN = "hf_bad_input_test_token_0123456789"
REPO = "tester/dpo-model"
SAVE_DIR = "released"
# checkpoint-4 passes this test; so a copy of it fails only because of what a row breaks in it.
MARGIN_TEST = """
    from pytest_dpo import assert_margin_positive

    def test_margin(dpo_result):
        assert_margin_positive(dpo_result)
"""


@dataclass
class Workspace:
    """Where a case writes its input (the pytester folder, also the working directory of a plugin run)."""

    path: Path
    monkeypatch: pytest.MonkeyPatch
    hub: HubServer | None = None

    def checkpoint(self, name: str = "checkpoint-4", source: Path = FULL_RUN / "checkpoint-4") -> Path:
        """A fresh copy of a fixture checkpoint to break."""
        target = self.path / "runs" / name
        shutil.copytree(source, target)
        return target

    def jsonl(self, rows: list[object], name: str = "eval.jsonl") -> str:
        (self.path / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
        return name


@dataclass(frozen=True)
class PluginRun:
    """`pytest <args>` with the plugin on a margin test; `save_dir` is where passing checkpoints would be saved."""

    args: list[str]
    exit: pytest.ExitCode
    save_dir: str | None = SAVE_DIR
    publishes: bool = False


@dataclass(frozen=True)
class ApiCall:
    """A call of the public API that must raise `error`."""

    call: Callable[[], object]
    error: type[BaseException]


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Workspace], PluginRun | ApiCall]
    where: str
    fix: str
    needs_hub: bool = False


def run(
    *args: str, exit: pytest.ExitCode = pytest.ExitCode.USAGE_ERROR, save_dir: str | None = SAVE_DIR, publishes: bool = False
) -> PluginRun:
    return PluginRun(list(args), exit, save_dir, publishes)


def checkpoint_run(checkpoint: Path | str, *extra: str, eval_set: Path | str = EVAL_STANDARD) -> PluginRun:
    """A run of one checkpoint against the base model that fails because of the checkpoint."""
    return run(f"--dpo-checkpoint={checkpoint}", f"--dpo-reference={BASE}", f"--dpo-eval-set={eval_set}", *extra,
               exit=pytest.ExitCode.TESTS_FAILED)


def usage_run(*extra: str, checkpoint: Path | str = FULL_RUN / "checkpoint-4") -> PluginRun:
    """A run refused at start-up, before any model is loaded; on the standard eval set unless `extra` gives one."""
    eval_set = [] if any(arg.startswith("--dpo-eval-set=") for arg in extra) else [f"--dpo-eval-set={EVAL_STANDARD}"]
    return run(f"--dpo-checkpoint={checkpoint}", f"--dpo-reference={BASE}", *eval_set, *extra)


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def set_weight(checkpoint: Path, name: str, value: float) -> None:
    weights = load_file(checkpoint / "model.safetensors")
    weights[name][3, 5] = value
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})


def standard_row(**fields: object) -> dict[str, object]:
    return {"prompt": "Q: 1+1?\nA: ", "chosen": "2.", "rejected": "3.", **fields}


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


# -- setups that need more than one line ------------------------------------------------------


def checkpoint_after_a_space_under_an_early_ini(work: Workspace) -> PluginRun:
    """`pytest --dpo-checkpoint run/checkpoint-4` where run/ has a pytest.ini that pytest applies before plugins load."""
    (work.path / "run").mkdir()
    (work.path / "run" / "pytest.ini").write_text("[pytest]\npythonpath = .\n")
    (work.path / "run" / "checkpoint-4").symlink_to(FULL_RUN / "checkpoint-4")
    (work.path / "pytest.ini").write_text(f"[pytest]\ndpo_eval_set = {EVAL_STANDARD}\ndpo_reference = {BASE}\n")
    return run("--dpo-checkpoint", "run/checkpoint-4")


def latin_1_csv(work: Workspace) -> str:
    (work.path / "eval.csv").write_bytes("prompt,chosen,rejected\nCafé?,oui,non\n".encode("latin-1"))
    return "eval.csv"


def binary_file(work: Workspace, name: str) -> str:
    (work.path / name).write_bytes(bytes(range(128, 256)) * 4)
    return name


def truncated_parquet(work: Workspace) -> str:
    import pandas

    pandas.DataFrame([standard_row()] * 8).to_parquet(work.path / "full.parquet")
    data = (work.path / "full.parquet").read_bytes()
    (work.path / "eval.parquet").write_bytes(data[: len(data) // 2])
    return "eval.parquet"


def saved_dataset_without_data(work: Workspace) -> str:
    import datasets

    datasets.Dataset.from_list([standard_row()] * 4).save_to_disk(str(work.path / "saved"))
    (work.path / "saved" / "data-00000-of-00001.arrow").unlink()
    return "saved"


def half_stringified_csv(work: Workspace) -> str:
    """A conversational set exported to CSV where one row's cells are plain text: half conversations, half not."""
    import pandas

    conversation = {"prompt": user("hi"), "chosen": assistant("a"), "rejected": assistant("b")}
    frame = pandas.DataFrame([conversation, {"prompt": "hi", "chosen": "a", "rejected": "b"}])
    frame.to_csv(work.path / "eval.csv", index=False)
    return "eval.csv"




def bad_json_line(work: Workspace) -> PluginRun:
    (work.path / "eval.jsonl").write_text(json.dumps(standard_row()) + "\n{oops\n")
    return usage_run("--dpo-eval-set=eval.jsonl")


def without_eos(work: Workspace) -> PluginRun:
    checkpoint = work.checkpoint()
    edit_json(checkpoint / "tokenizer_config.json", lambda config: config.update(eos_token=None))
    edit_json(checkpoint / "tokenizer.json", lambda tokenizer: tokenizer.update(
        added_tokens=[token for token in tokenizer["added_tokens"] if token["content"] != "</s>"]))
    return checkpoint_run(checkpoint)


def without_pad_token(work: Workspace) -> PluginRun:
    checkpoint = work.checkpoint()
    edit_json(checkpoint / "tokenizer_config.json", lambda config: config.pop("pad_token", None))
    return run(f"--dpo-checkpoint={checkpoint}", f"--dpo-reference={BASE}", f"--dpo-eval-set={EVAL_STANDARD}",
               exit=pytest.ExitCode.OK, publishes=True)


def without_chat_template(work: Workspace) -> PluginRun:
    checkpoint = work.checkpoint()
    (checkpoint / "chat_template.jinja").unlink()
    edit_json(checkpoint / "tokenizer_config.json", lambda config: config.pop("chat_template", None))
    return checkpoint_run(checkpoint, eval_set=EVAL_CONVERSATIONAL)


def without_weights(work: Workspace) -> PluginRun:
    (work.checkpoint() / "model.safetensors").unlink()
    return usage_run(checkpoint="runs/checkpoint-4")


def truncated_weights(work: Workspace) -> PluginRun:
    weights = work.checkpoint() / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return checkpoint_run("runs/checkpoint-4")


def config_of_another_model(work: Workspace) -> PluginRun:
    edit_json(work.checkpoint() / "config.json", lambda config: config.update(intermediate_size=48))
    return checkpoint_run("runs/checkpoint-4")


def adapter_without_base(work: Workspace) -> PluginRun:
    adapter = work.checkpoint("checkpoint-6", LORA_RUN / "checkpoint-6")
    gone = work.path / "gone" / "base"
    edit_json(adapter / "adapter_config.json", lambda config: config.update(base_model_name_or_path=str(gone)))
    return run(f"--dpo-checkpoint={adapter}", f"--dpo-eval-set={EVAL_STANDARD}", exit=pytest.ExitCode.TESTS_FAILED)


def reference_with_another_vocabulary(work: Workspace) -> PluginRun:
    reference = work.checkpoint("other-base", BASE)
    edit_json(reference / "config.json", lambda config: config.update(vocab_size=600))
    return run(f"--dpo-checkpoint={FULL_RUN / 'checkpoint-4'}", f"--dpo-reference={reference}",
               f"--dpo-eval-set={EVAL_STANDARD}", exit=pytest.ExitCode.TESTS_FAILED)


def non_finite_weights(value: float) -> Callable[[Workspace], PluginRun]:
    def setup(work: Workspace) -> PluginRun:
        checkpoint = work.checkpoint()
        set_weight(checkpoint, "model.layers.1.mlp.up_proj.weight", value)
        # The ini gates of examples/pytest.ini: a broken checkpoint must fail them too, never pass one.
        (work.path / "pytest.ini").write_text("[pytest]\ndpo_gates =\n    rewards/accuracies >= 0.6\n    rewards/margins > 0\n")
        return checkpoint_run("runs/checkpoint-4")

    return setup


def output_dir_without_checkpoints(work: Workspace) -> PluginRun:
    run_dir = work.path / "runs" / "dpo-fresh"
    run_dir.mkdir(parents=True)
    for name in ("training_args.bin", "README.md", "config.json"):
        shutil.copy(FULL_RUN / name, run_dir)
    return usage_run(checkpoint="runs/dpo-fresh")


def as_pickle(folder: Path, safetensors_name: str, pickle_name: str) -> None:
    """Replace a folder's safetensors weights by the same tensors saved with `torch.save` (a pickle)."""
    torch.save(load_file(folder / safetensors_name), folder / pickle_name)
    (folder / safetensors_name).unlink()


def pickle_only(work: Workspace) -> PluginRun:
    as_pickle(work.checkpoint(), "model.safetensors", "pytorch_model.bin")
    return usage_run(checkpoint="runs/checkpoint-4")


def pickle_only_adapter(work: Workspace) -> PluginRun:
    as_pickle(work.checkpoint("checkpoint-6", LORA_RUN / "checkpoint-6"), "adapter_model.safetensors", "adapter_model.bin")
    return usage_run(checkpoint="runs/checkpoint-6")


def bare_torch_save(work: Workspace) -> PluginRun:
    as_pickle(work.checkpoint(), "model.safetensors", "model.pt")
    return usage_run(checkpoint="runs/checkpoint-4")


def remote_code(config_name: str) -> Callable[[Workspace], PluginRun]:
    def setup(work: Workspace) -> PluginRun:
        checkpoint = work.checkpoint()
        auto_map = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM", "AutoTokenizer": ["tokenization_evil.Evil", None]}
        edit_json(checkpoint / config_name, lambda config: config.update(auto_map=auto_map))
        return checkpoint_run("runs/checkpoint-4")

    return setup


def gate_lines(*lines: str) -> Callable[[Workspace], PluginRun]:
    def setup(work: Workspace) -> PluginRun:
        (work.path / "pytest.ini").write_text("[pytest]\ndpo_gates =\n" + "".join(f"    {line}\n" for line in lines))
        return usage_run()

    return setup


def older_eval_set_key(work: Workspace) -> PluginRun:
    """`dpo_eval_set = PATH`, the ini key of a single eval set, still read."""
    (work.path / "pytest.ini").write_text(f"[pytest]\ndpo_eval_set = nowhere.jsonl\ndpo_reference = {BASE}\n")
    return run(f"--dpo-checkpoint={FULL_RUN}/checkpoint-4")


def blocked_save_dir(work: Workspace) -> PluginRun:
    (work.path / "blocked").write_text("a file where the save dir should be")
    return run(f"--dpo-checkpoint={FULL_RUN / 'checkpoint-4'}", f"--dpo-reference={BASE}", f"--dpo-eval-set={EVAL_STANDARD}",
               exit=pytest.ExitCode.TESTS_FAILED, save_dir="blocked/released")


@cache
def passing_release() -> publish.Release:
    result = evaluate(FULL_RUN / "checkpoint-4", EVAL_STANDARD, reference=BASE)
    (checkpoint,) = discover_checkpoints(FULL_RUN / "checkpoint-4")
    return publish.Release("checkpoint-4", checkpoint, result, ["test_margin"], "eval_standard.jsonl", None)


def disk_full(work: Workspace) -> ApiCall:
    real_copy = shutil.copyfile
    copies: list[str] = []

    def copy_until_full(source: str, destination: str) -> object:
        copies.append(source)
        if len(copies) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(source, destination)

    release = passing_release()
    work.monkeypatch.setattr(publish.shutil, "copyfile", copy_until_full)
    return ApiCall(lambda: publish.save_release(release, work.path / SAVE_DIR), publish.PublishError)


def push(*extra: str, repo: str = REPO) -> PluginRun:
    """Push the passing checkpoint-4 (no local save, so the Hub is the only place it could be published)."""
    return run(f"--dpo-checkpoint={FULL_RUN / 'checkpoint-4'}", f"--dpo-reference={BASE}", f"--dpo-eval-set={EVAL_STANDARD}",
               f"--dpo-push-to={repo}", *extra, exit=pytest.ExitCode.TESTS_FAILED, save_dir=None)


def hub_refuses_token(work: Workspace) -> PluginRun:
    work.monkeypatch.setenv("HF_TOKEN", "hf_not_a_known_token")
    return push()


def hub_fails(work: Workspace) -> PluginRun:
    assert work.hub is not None
    work.hub.fail_next("POST", r"/api/models/tester/dpo-model/commit/", status=500, times=2)
    return push()


def hub_hangs(work: Workspace) -> PluginRun:
    assert work.hub is not None
    work.hub.hang_next("POST", r"/api/models/tester/dpo-model/commit/", seconds=30)
    return push("--dpo-push-timeout=1")


def nan_margin(work: Workspace) -> ApiCall:
    result = passing_release().result
    broken = dataclasses.replace(result, metrics={**result.metrics, "rewards/margins": float("nan")})
    return ApiCall(lambda: assert_margin_positive(broken), AssertionError)


def sharded_missing_shard(work: Workspace) -> PluginRun:
    checkpoint = work.checkpoint()
    shard(checkpoint)
    (checkpoint / "model-00002-of-00002.safetensors").unlink()
    return checkpoint_run("runs/checkpoint-4")


def sharded_corrupt_index(work: Workspace) -> PluginRun:
    checkpoint = work.checkpoint()
    shard(checkpoint)
    (checkpoint / "model.safetensors.index.json").write_text('{"weight_map": ')
    return checkpoint_run("runs/checkpoint-4")


def corrupt_config(work: Workspace) -> PluginRun:
    (work.checkpoint() / "config.json").write_text('{"model_type": "llama",')
    return checkpoint_run("runs/checkpoint-4")


def adapter_without_weights(work: Workspace) -> PluginRun:
    (work.checkpoint("checkpoint-6", LORA_RUN / "checkpoint-6") / "adapter_model.safetensors").unlink()
    return usage_run(checkpoint="runs/checkpoint-6")


def adapter_corrupt_config(work: Workspace) -> PluginRun:
    (work.checkpoint("checkpoint-6", LORA_RUN / "checkpoint-6") / "adapter_config.json").write_text("{not json")
    return run("--dpo-checkpoint=runs/checkpoint-6", f"--dpo-eval-set={EVAL_STANDARD}")


def output_dir_with_a_broken_checkpoint(work: Workspace) -> PluginRun:
    run_dir = work.path / "runs" / "dpo-full"
    shutil.copytree(FULL_RUN, run_dir)
    (run_dir / "checkpoint-4" / "model.safetensors").write_bytes(b"\0" * 64)
    # Only checkpoint-4's tests run: the others have none, so none of them may be published either.
    return checkpoint_run("runs/dpo-full", "-k", "checkpoint-4")


def baseline_of_another_eval_set(work: Workspace) -> PluginRun:
    """A saved report whose checkpoint passed on half of the eval set this run scores."""
    half = work.path / "half.jsonl"
    half.write_text("\n".join(EVAL_STANDARD.read_text().splitlines()[:12]) + "\n")
    release = passing_release()
    verdicts = Verdicts(["checkpoint-4"])
    verdicts.expect("checkpoint-4", "test_margin")
    verdicts.record("checkpoint-4", "test_margin", "call", "passed")
    entry = report_entry(release.checkpoint, verdicts["checkpoint-4"], release.result)
    saved_report = build_report([entry], eval_set=eval_set_record(load_eval_set(half)), gates=[], settings={}, versions={})
    write_report(work.path / "release", saved_report, per_example_of([entry]), log=lambda line: None)
    return usage_run("--dpo-baseline=release")


# -- the table --------------------------------------------------------------------------------

FAILED = pytest.ExitCode.TESTS_FAILED
CASES = [
    # The eval set: refused before any model is loaded, with the file, the line and the field.
    Case("eval-set-not-given", lambda work: run(f"--dpo-checkpoint={FULL_RUN}"),
         "--dpo-eval-set / dpo_eval_sets: no eval set given", "Pass the frozen preference eval set"),
    Case("eval-set-not-found", lambda work: usage_run("--dpo-eval-set=missing.jsonl"),
         "--dpo-eval-set / dpo_eval_sets: missing.jsonl: eval set not found", "Check the path"),
    Case("eval-set-empty", lambda work: usage_run(f"--dpo-eval-set={work.jsonl([])}"),
         "eval.jsonl: the file is empty", "Add preference rows with 'chosen' and 'rejected'"),
    Case("non-json-line", bad_json_line, "eval.jsonl:2: not valid JSON", "fix or remove this line"),
    Case("row-missing-chosen", lambda work: usage_run(f"--dpo-eval-set={work.jsonl([standard_row(), {'prompt': 'p', 'rejected': 'r'}])}"),
         "eval.jsonl:2: missing field 'chosen'", "Every row needs 'chosen' and 'rejected'"),
    Case("row-missing-rejected", lambda work: usage_run(f"--dpo-eval-set={work.jsonl([{'prompt': 'p', 'chosen': 'c'}])}"),
         "eval.jsonl:1: missing field 'rejected'", "Every row needs 'chosen' and 'rejected'"),
    Case("row-missing-prompt", lambda work: usage_run(f"--dpo-eval-set={work.jsonl([standard_row(), {'chosen': 'a b', 'rejected': 'a c'}])}"),
         "eval.jsonl:2: this row has no 'prompt' but the first row", "give every row a prompt, or none"),
    Case("wrong-type", lambda work: usage_run(f"--dpo-eval-set={work.jsonl([standard_row(chosen=2)])}"),
         "eval.jsonl:1: field 'chosen' is a int", "Use one format for the whole file"),
    Case("empty-completion", lambda work: usage_run(f"--dpo-eval-set={work.jsonl([standard_row(rejected='')])}"),
         "eval.jsonl:1: field 'rejected' is empty", "fill it or remove the row"),
    Case("bad-role", lambda work: usage_run(f"--dpo-eval-set={work.jsonl([{'prompt': user('hi'), 'chosen': [{'role': 'bot', 'content': 'a'}], 'rejected': assistant('b')}])}"),
         "eval.jsonl:1: field 'chosen' message 0: role 'bot' is not one of", "Fix the role"),
    Case("missing-content", lambda work: usage_run(f"--dpo-eval-set={work.jsonl([{'prompt': user('hi'), 'chosen': assistant('a'), 'rejected': [{'role': 'assistant'}]}])}"),
         "eval.jsonl:1: field 'rejected' message 0: missing or non-string 'content'", "Every message needs its text in 'content'"),
    Case("mixed-formats", lambda work: usage_run(f"--dpo-eval-set={work.jsonl([standard_row(), {'prompt': user('hi'), 'chosen': assistant('a'), 'rejected': assistant('b')}])}"),
         "eval.jsonl:2: field 'prompt' is a list, but the first row is in standard format", "Use one format for the whole file"),
    Case("eval-set-latin-1-csv", lambda work: usage_run(f"--dpo-eval-set={latin_1_csv(work)}"),
         "eval.csv:2: not UTF-8 text (byte 0xe9", "Save the file as UTF-8"),
    Case("eval-set-binary-jsonl", lambda work: usage_run(f"--dpo-eval-set={binary_file(work, 'eval.jsonl')}"),
         "eval.jsonl:1: not UTF-8 text", "Save the file as UTF-8"),
    Case("eval-set-binary-json", lambda work: usage_run(f"--dpo-eval-set={binary_file(work, 'eval.json')}"),
         "eval.json:1: not UTF-8 text", "Save the file as UTF-8"),
    Case("eval-set-truncated-parquet", lambda work: usage_run(f"--dpo-eval-set={truncated_parquet(work)}"),
         "eval.parquet: not a readable parquet file", "Re-export the eval set"),
    Case("eval-set-saved-dataset-missing-arrow", lambda work: usage_run(f"--dpo-eval-set={saved_dataset_without_data(work)}"),
         "saved/data-00000-of-00001.arrow", "save the dataset again with save_to_disk"),
    Case("eval-set-vision-rows", lambda work: usage_run(f"--dpo-eval-set={work.jsonl([standard_row(), standard_row(images=['a.png'])])}"),
         "eval.jsonl:2", "use a text-only eval set"),
    Case("eval-set-messages-as-text-in-some-rows", lambda work: usage_run(f"--dpo-eval-set={half_stringified_csv(work)}"),
         "eval.csv:3: field 'prompt' is plain text, but other cells hold message lists", "Save the eval set as .jsonl or .parquet"),
    Case("prompt-fills-max-length", lambda work: checkpoint_run(FULL_RUN / "checkpoint-4", "--dpo-max-length=3"),
         "every row's prompt alone fills max_length=3", "Raise max_length (--dpo-max-length)"),
    # Tokenizers.
    Case("tokenizer-without-eos", without_eos, "checkpoint-4 has no EOS token", "Set `eos_token` in its tokenizer_config.json"),
    Case("tokenizer-without-pad-token-is-fine", without_pad_token, "saved checkpoint-4 into", f"{SAVE_DIR}/checkpoint-4"),
    Case("no-chat-template-for-conversations", without_chat_template,
         "eval_conversational.jsonl: conversational rows need a chat template", "Save the tokenizer with its chat template"),
    # Checkpoints and references.
    Case("checkpoint-after-a-space-under-another-ini", checkpoint_after_a_space_under_an_early_ini,
         "run/pytest.ini, not", "Write the option with '=' (--dpo-checkpoint=PATH), or name the ini file: -c"),
    Case("checkpoint-not-found", lambda work: usage_run(checkpoint="nowhere"),
         "--dpo-checkpoint / dpo_checkpoint: nowhere: checkpoint not found", "Check the path"),
    Case("glob-matches-nothing", lambda work: usage_run(checkpoint="runs/checkpoint-*"),
         "runs/checkpoint-*: the glob matches nothing", "Check the pattern"),
    Case("folder-without-weights", without_weights,
         "runs/checkpoint-4: no weights found (expected model.safetensors)", "Point at a model or adapter folder saved with save_pretrained"),
    Case("output-dir-without-checkpoints", output_dir_without_checkpoints,
         "runs/dpo-fresh: no weights found (expected model.safetensors) and no checkpoint-N folders", "or at a TRL output_dir"),
    Case("truncated-safetensors", truncated_weights,
         "runs/checkpoint-4/model.safetensors: cannot read the safetensors weights", "Copy the checkpoint again"),
    Case("config-does-not-fit-weights", config_of_another_model,
         "runs/checkpoint-4/config.json: the weights do not fit this config ('model.layers.0.mlp.down_proj.weight' is [32, 64]",
         "Use the config.json that was saved with these weights"),
    Case("adapter-base-missing", adapter_without_base,
         "checkpoint-6/adapter_config.json: the base model", "Put the base model there, or set base_model_name_or_path"),
    Case("no-reference-for-a-full-model", lambda work: run(f"--dpo-checkpoint={FULL_RUN / 'checkpoint-4'}", f"--dpo-eval-set={EVAL_STANDARD}", exit=FAILED),
         "checkpoint-4: no reference model given", "Pass the model the DPO run started from with --dpo-reference"),
    Case("hub-id-not-cached-offline",
         lambda work: run(f"--dpo-checkpoint={FULL_RUN / 'checkpoint-4'}", "--dpo-reference=some-org/not-downloaded",
                          f"--dpo-eval-set={EVAL_STANDARD}", exit=FAILED),
         "some-org/not-downloaded: not a local folder, and this Hub id is not in the local Hugging Face cache",
         "Download it first (hf download some-org/not-downloaded)"),
    Case("reference-vocabulary-differs", reference_with_another_vocabulary,
         "other-base/config.json: the reference has vocab_size 600, but the checkpoint's", "Pass as reference the model the DPO run started from"),
    Case("nan-in-weights", non_finite_weights(float("nan")),
         "runs/checkpoint-4/model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' holds 1 NaN/inf value(s)",
         "Use an earlier checkpoint (training diverged)"),
    Case("inf-in-weights", non_finite_weights(float("-inf")),
         "runs/checkpoint-4/model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' holds 1 NaN/inf value(s)",
         "copy the file again if it was damaged"),
    Case("nan-metric-in-a-helper", nan_margin,
         "checkpoint-4: rewards/margins is NaN, not above 0: the checkpoint's weights or logits contain NaN/inf",
         "assert_metrics_finite lists the rows"),
    Case("duplicate-checkpoint-paths", lambda work: usage_run(f"--dpo-checkpoint={FULL_RUN / 'checkpoint-4'}"),
         f"--dpo-checkpoint / dpo_checkpoint: {FULL_RUN / 'checkpoint-4'} is given twice", "Give each checkpoint once"),
    Case("same-checkpoint-through-a-glob", lambda work: run(f"--dpo-checkpoint={FULL_RUN}", f"--dpo-checkpoint={FULL_RUN}/checkpoint-[46]", f"--dpo-eval-set={EVAL_STANDARD}"),
         "checkpoint-4 is given twice (through", "Give each checkpoint once"),
    Case("sharded-weights-missing-a-shard", sharded_missing_shard,
         "runs/checkpoint-4/model-00002-of-00002.safetensors", "Copy the checkpoint again"),
    Case("sharded-weights-corrupt-index", sharded_corrupt_index,
         "runs/checkpoint-4/model.safetensors.index.json: not valid JSON", "Copy the checkpoint again"),
    Case("model-config-not-json", corrupt_config,
         "runs/checkpoint-4/config.json: not valid JSON", "Copy the checkpoint again"),
    Case("adapter-without-weights", adapter_without_weights,
         "runs/checkpoint-6: no weights found (expected adapter_model.safetensors)", "Point at a model or adapter folder"),
    Case("adapter-config-not-json", adapter_corrupt_config,
         "runs/checkpoint-6/adapter_config.json: not valid JSON", "Copy the checkpoint again"),
    Case("output-dir-with-a-broken-checkpoint", output_dir_with_a_broken_checkpoint,
         "runs/dpo-full/checkpoint-4/model.safetensors: cannot read the safetensors weights", "Copy the checkpoint again"),
    Case("baseline-not-found", lambda work: usage_run("--dpo-baseline=releases/last"),
         "--dpo-baseline / dpo_baseline: releases/last: not found", "Give the last release's checkpoint folder"),
    Case("baseline-of-another-eval-set", baseline_of_another_eval_set,
         "--dpo-baseline / dpo_baseline: release was scored on another eval set", "Point it at a report of this eval set"),
    # Unsafe checkpoints: refused unless the user accepts the risk with a flag the message names.
    Case("pickle-only-weights", pickle_only,
         "runs/checkpoint-4/pytorch_model.bin: weights are stored only as a pickle", "pass --dpo-allow-pickle"),
    Case("pickle-only-adapter", pickle_only_adapter,
         "runs/checkpoint-6/adapter_model.bin: weights are stored only as a pickle", "pass --dpo-allow-pickle"),
    Case("bare-torch-save-weights", bare_torch_save,
         "runs/checkpoint-4/model.pt: weights saved with torch.save", "save it with `save_pretrained(..., safe_serialization=True)`"),
    Case("auto-map-in-config", remote_code("config.json"),
         "runs/checkpoint-4/config.json: its auto_map (AutoModelForCausalLM, AutoTokenizer) asks to run Python code",
         "Pass --dpo-trust-remote-code"),
    Case("auto-map-in-tokenizer-config", remote_code("tokenizer_config.json"),
         "runs/checkpoint-4/tokenizer_config.json: its auto_map", "Pass --dpo-trust-remote-code"),
    # Settings and gates.
    Case("unknown-loss-type", lambda work: usage_run("--dpo-loss-type=sigmoidd"),
         "--dpo-loss-type / dpo_loss_type: Unknown loss_type 'sigmoidd'", "Choose from: sigmoid"),
    Case("beta-not-positive", lambda work: usage_run("--dpo-beta=-0.1"),
         "--dpo-beta / dpo_beta: beta must be > 0, got -0.1", "Use the beta the checkpoint was trained with"),
    Case("label-smoothing-out-of-range", lambda work: usage_run("--dpo-label-smoothing=0.7"),
         "--dpo-label-smoothing / dpo_label_smoothing: label_smoothing must be in [0, 0.5), got 0.7",
         "Use the value the checkpoint was trained with"),
    Case("malformed-gate-line", gate_lines("loss <= 0.7", "rewards/margins => 0"),
         "dpo_gates line 2: cannot read gate 'rewards/margins => 0'", "Write `<metric> <op> <number>`"),
    Case("unknown-metric-in-gate", gate_lines("rewards/acc >= 0.6"),
         "dpo_gates line 1: unknown metric 'rewards/acc'", "Known metrics: loss"),
    # Several eval sets and subsets.
    Case("unknown-eval-set-in-gate", gate_lines("loss <= 0.75", "safety: loss <= 0.7"),
         "dpo_gates line 2: gate 'safety: loss <= 0.7' names eval set 'safety'", "Known eval sets: default."),
    Case("subset-gate-without-subset-column", gate_lines("default/math: loss <= 0.7"),
         "dpo_gates line 1: gate 'default/math: loss <= 0.7' is on subset 'math', but no column splits",
         "Name it with --dpo-subset-column / dpo_subset_column"),
    Case("eval-set-in-the-older-ini-key", older_eval_set_key, "--dpo-eval-set / dpo_eval_sets: nowhere.jsonl: eval set not found",
         "Check the path"),
    Case("eval-set-name-given-twice", lambda work: usage_run(f"--dpo-eval-set={EVAL_STANDARD}", "--dpo-eval-set=e.jsonl"),
         "--dpo-eval-set: eval set 'default' is given twice", "Give each set its own name"),
    Case("eval-set-name-malformed", lambda work: run(f"--dpo-checkpoint={FULL_RUN}", "--dpo-eval-set=my set=eval.jsonl"),
         "--dpo-eval-set: 'my set' in 'my set=eval.jsonl' is not an eval-set name", "Use letters, digits"),
    Case("named-eval-set-not-found", lambda work: run(f"--dpo-checkpoint={FULL_RUN}", "--dpo-eval-set=safety=gone.jsonl"),
         "--dpo-eval-set / dpo_eval_sets: eval set 'safety': gone.jsonl: eval set not found", "Check the path"),
    Case("subset-column-value-missing", lambda work: usage_run(
             "--dpo-subset-column=subset", f"--dpo-eval-set={EVAL_STANDARD}",
             f"--dpo-eval-set=topics={work.jsonl([standard_row(subset='a'), standard_row()], 'topics.jsonl')}"),
         "topics.jsonl:2: 'subset' is missing", "every row needs a subset name"),
    # Publishing.
    Case("save-dir-not-writable", blocked_save_dir, "cannot write to save dir blocked/released", "Choose a writable --dpo-save-dir"),
    Case("disk-full-while-saving", disk_full,
         "saving checkpoint-4 into", "No space left on device. Nothing was left under that name; free space"),
    Case("push-repo-id-invalid", lambda work: usage_run("--dpo-push-to=not a repo"),
         "--dpo-push-to / dpo_push_to: 'not a repo' is not a Hub repo id", "Write it as namespace/name"),
    Case("push-timeout-invalid", lambda work: usage_run(f"--dpo-push-to={REPO}", "--dpo-push-timeout=soon"),
         "--dpo-push-timeout / dpo_push_timeout: 'soon' is not a number of seconds", "e.g. 60"),
    Case("hub-401-bad-token", hub_refuses_token,
         "cannot reach or create Hub repo tester/dpo-model: Client error '401", "log in with `hf auth login` or set HF_TOKEN", needs_hub=True),
    Case("hub-403-foreign-namespace", lambda work: push(repo="someone-else/dpo-model"),
         "cannot reach or create Hub repo someone-else/dpo-model: 403 Forbidden", "use a token with write access there", needs_hub=True),
    Case("hub-500", hub_fails,
         "pushing checkpoint-4 to tester/dpo-model failed: Server error '500", "The Hub failed on its side: run again later", needs_hub=True),
    Case("hub-timeout", hub_hangs,
         "pushing checkpoint-4 to tester/dpo-model failed", "The Hub did not answer within 1 s: retry later, or raise --dpo-push-timeout",
         needs_hub=True),
]

# -- a bad value for every option and ini key ------------------------------------------------
# (value, fix) per option of `pytest_dpo.options.ALL_OPTIONS`; flags take no value on the command line, so only
# their ini twins get one. `test_every_option_and_ini_key_has_a_row` keeps this table complete.
FILE_IN_THE_WAY = "a-file"
BAD_FLAG_VALUE = ("maybe", "Write true or false")
BAD_OPTION_VALUES = {
    "checkpoint": ("nowhere", "Check the path"),
    "reference": ("nowhere", "Download it first"),
    "eval_set": ("nowhere.jsonl", "Check the path"),
    "eval_set_options": ("max_length 64", "Write `NAME: key=value …`"),
    "subset_column": ("topic", "no eval set has a column 'topic'"),
    "baseline": ("nowhere", "Give the last release's checkpoint folder"),
    "gate": ("rewards/margins => 0", "Write `<metric> <op> <number>`"),
    "beta": ("lots", "give a number"),
    "loss_type": ("sigmoidd", "Choose from: sigmoid"),
    "loss_weights": ("1,x", "give comma-separated numbers"),
    "label_smoothing": ("lots", "give a number"),
    "discopop_tau": ("0", "discopop_tau must be > 0"),
    "ld_alpha": ("lots", "give a number, or none"),
    "f_divergence_type": ("kl", "Choose from: reverse_kl, forward_kl"),
    "f_alpha_divergence_coef": ("inf", "must be a finite number"),
    "use_weighting": ("maybe", "give true or false"),
    "router_aux_loss_coef": ("lots", "give a number, or none"),
    "max_length": ("lots", "give a whole number, or none"),
    "truncation_mode": ("keep_middle", "Choose from: keep_start, keep_end"),
    "batch_size": ("0", "batch_size must be at least 1"),
    "device": ("gpu", "Use cpu, cuda, cuda:N or mps"),
    "dtype": ("float8", "Choose from: float32"),
    "device_map": ("everywhere", "Choose from: auto"),
    "share_prompt": ("maybe", "give true or false"),
    "lock": ("lockdir", "Give the lock file's path"),
    "report": (FILE_IN_THE_WAY, "Give a folder path"),
    "samples": ("-1", "Give how many prompts to sample"),
    "generation": ("max_new_tokens", "Write a transformers GenerationConfig field"),
    "cache_dir": (FILE_IN_THE_WAY, "Give a folder path"),
    "save_dir": (FILE_IN_THE_WAY, "Give a folder path"),
    "push_to": ("not a repo", "Write it as namespace/name"),
    "push_revision": ("a..b", "Use letters, digits"),
    "push_which": ("some", "Choose all"),
    "push_timeout": ("soon", "e.g. 60"),
}
# A reference is resolved when its checkpoint is scored: that checkpoint's tests fail, the session goes on.
FAILS_THE_CHECKPOINT = {"reference"}


def option_value_setup(spec_name: str, form: str) -> Callable[[Workspace], PluginRun]:
    spec = next(spec for spec in ALL_OPTIONS if spec.name == spec_name)
    value = BAD_FLAG_VALUE[0] if spec.is_flag else BAD_OPTION_VALUES[spec_name][0]

    def setup(work: Workspace) -> PluginRun:
        (work.path / FILE_IN_THE_WAY).write_text("a file where a folder should be")
        (work.path / "lockdir").mkdir()
        given = {"checkpoint": FULL_RUN / "checkpoint-4", "reference": BASE, "eval_set": EVAL_STANDARD}
        if form == "command line":
            given[spec_name] = value
            args = [f"--dpo-{name.replace('_', '-')}={path}" for name, path in given.items()]
            args += [] if spec_name in given else [f"{spec.flag}={value}"]
        else:
            given.pop(spec_name, None)
            args = [f"--dpo-{name.replace('_', '-')}={path}" for name, path in given.items()]
            indent = "\n    " if spec.ini_type in ("linelist", "paths") else " "
            (work.path / "pytest.ini").write_text(f"[pytest]\n{spec.ini} ={indent}{value}\n")
        exit = pytest.ExitCode.TESTS_FAILED if spec_name in FAILS_THE_CHECKPOINT else pytest.ExitCode.USAGE_ERROR
        # The save dir row gives its own; every other row saves into SAVE_DIR, which must stay empty.
        return run(*args, exit=exit, save_dir=None if spec_name == "save_dir" else SAVE_DIR)

    return setup


def option_cases() -> list[Case]:
    cases = []
    for spec in ALL_OPTIONS:
        fix = BAD_FLAG_VALUE[1] if spec.is_flag else BAD_OPTION_VALUES[spec.name][1]
        forms = ["ini"] if spec.is_flag else ["command line", "ini"]
        for form in forms:
            where = spec.ini if form == "ini" else spec.flag
            if spec.name in FAILS_THE_CHECKPOINT:
                where = "nowhere: not a local folder"
            cases.append(Case(f"{spec.ini}-{form.replace(' ', '-')}", option_value_setup(spec.name, form), where, fix))
    return cases


CASES += option_cases()


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    with HubServer(tmp_path / "hub-storage", tokens={TOKEN: "tester"}) as server:
        with hub_environment(server, tmp_path / "hf-home", TOKEN):
            yield server


def release_commits(hub: HubServer | None) -> list[str]:
    if hub is None or REPO not in hub.repos:
        return []
    return [commit.summary for commit in hub.repo(REPO).commits if commit.summary.startswith("Release")]


def saved(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_refused_naming_the_place_and_the_fix(
    case: Case, pytester: pytest.Pytester, request: pytest.FixtureRequest
) -> None:
    hub = request.getfixturevalue("hub") if case.needs_hub else None
    # Its own monkeypatch, undone before the Hub environment is: the test's would restore HF_TOKEN after it.
    with pytest.MonkeyPatch.context() as patch:
        check(case, pytester, Workspace(pytester.path, patch, hub))


def check(case: Case, pytester: pytest.Pytester, work: Workspace) -> None:
    action = case.setup(work)
    if isinstance(action, ApiCall):
        with pytest.raises(action.error) as excinfo:
            action.call()
        message = str(excinfo.value)
        published = saved(work.path / SAVE_DIR)
    else:
        pytester.makepyfile(test_release=textwrap.dedent(MARGIN_TEST))
        save = [f"--dpo-save-dir={action.save_dir}"] if action.save_dir else []
        no_cache = [] if "dpo_no_cache" in case.id else ["--dpo-no-cache"]
        result = pytester.runpytest(*action.args, *save, *no_cache)
        message = result.stdout.str() + result.stderr.str()
        assert result.ret == action.exit, message
        published = (saved(work.path / action.save_dir) if action.save_dir else []) + release_commits(work.hub)
        assert bool(published) == action.publishes, published
    assert case.where in message, message
    assert case.fix in message, message
    assert "INTERNALERROR" not in message and "Traceback" not in message, message
    if not (isinstance(action, PluginRun) and action.publishes):
        assert published == []


def test_the_table_covers_the_issue_list() -> None:
    assert len(CASES) >= 30
    assert len({case.id for case in CASES}) == len(CASES)


def test_every_option_and_ini_key_has_a_row() -> None:
    valued = {spec.name for spec in ALL_OPTIONS if not spec.is_flag}
    assert set(BAD_OPTION_VALUES) == valued
    ids = {case.id for case in CASES}
    for spec in ALL_OPTIONS:
        assert f"{spec.ini}-ini" in ids
        assert spec.is_flag or f"{spec.ini}-command-line" in ids
