"""Eval sets read from the Hugging Face Hub: `hub:org/name[:split][@revision]`.

`snapshot_download(repo_id, repo_type="dataset", revision=...)` fetches the dataset repo at one commit,
or with `HF_HUB_OFFLINE=1` finds it in the local Hub cache; either way it returns `.../snapshots/<sha>`,
so the commit read is known online and offline alike. `datasets.load_dataset(<that folder>)` then reads
it with the rules it applies to Hub datasets (the README's `configs`, data file names such as
`data/test-*.parquet` or `test.jsonl`), so the splits are the ones `load_dataset("org/name")` gives,
with no further network call. A split's rows come from its Arrow table through
`evalset_files.read_arrow_rows`: the values `datasets`' `to_list()` gives for text and list columns,
with Arrow's null filling undone as for a parquet file, and image columns left undecoded for
`evalset` to refuse.

Owns parsing the source text (`parse_hub_source`) and turning every Hub and `datasets` failure into
one `EvalSetError` line naming the source and the fix. Must not validate rows (that is `evalset`);
`datasets` (the `hub` extra) and huggingface_hub are imported only when a Hub source is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from .evalset import HUB_PREFIX, EvalSetError
from .evalset_files import read_arrow_rows

DEFAULT_REVISION = "main"
DEFAULT_SPLIT = "test"
SOURCE_FORM = "hub:org/name[:split][@revision], e.g. hub:HuggingFaceH4/ultrafeedback_binarized:test_prefs"
_REPO_PART = re.compile(r"[\w.-]{1,96}", re.ASCII)
_SPLIT = re.compile(r"[\w.-]+", re.ASCII)


@dataclass(frozen=True)
class HubSource:
    """A Hub eval set source: the dataset, its split (None: chosen when read) and the revision."""

    repo_id: str
    split: str | None
    revision: str


def parse_hub_source(text: str) -> HubSource:
    """Parse `hub:[org/]name[:split][@revision]`; the revision defaults to `main`.

    Args:
        text (`str`): the source as the user wrote it.

    Raises:
        EvalSetError: the text is not of that form; the message names it and shows the form.

    Example:
        >>> parse_hub_source("hub:HuggingFaceH4/ultrafeedback_binarized:test_prefs@v1.0")
        HubSource(repo_id='HuggingFaceH4/ultrafeedback_binarized', split='test_prefs', revision='v1.0')
        >>> parse_hub_source("hub:tester/prefs")
        HubSource(repo_id='tester/prefs', split=None, revision='main')
    """
    if not text.startswith(HUB_PREFIX):
        _malformed(text, f"it does not start with {HUB_PREFIX!r}")
    if any(character.isspace() for character in text):
        _malformed(text, "it contains whitespace")
    rest, has_revision, revision = text[len(HUB_PREFIX) :].partition("@")
    repo_id, has_split, split = rest.partition(":")
    if not repo_id:
        _malformed(text, "it names no dataset")
    if has_revision and not revision:
        _malformed(text, "the revision after '@' is empty")
    if has_split and not split:
        _malformed(text, "the split after ':' is empty")
    if has_split and not _SPLIT.fullmatch(split):
        _malformed(text, f"the split {split!r} may only hold letters, digits, '_', '.' and '-'")
    problem = _repo_id_problem(repo_id)
    if problem:
        _malformed(text, problem)
    return HubSource(repo_id, split or None, revision or DEFAULT_REVISION)


def read_hub_source(source: str) -> tuple[str, list[dict[str, Any]], list[str], str]:
    """Read one split of a Hub dataset: (the source as given, its rows, their locations, the commit sha read).

    Locations are `hub:org/name:split row N` (0-based). See the module docstring for how it is read.

    Raises:
        EvalSetError: the source is malformed, `datasets` is missing, the dataset, revision or split is
            not found (online, or offline in the local cache), or reading it fails; one line naming the fix.
    """
    hub_source = parse_hub_source(source)
    datasets = _import_datasets(source)
    folder = _snapshot_folder(source, hub_source)
    try:
        splits = datasets.load_dataset(str(folder))
    except Exception as error:  # datasets raises many unrelated types for unreadable repos
        raise EvalSetError(
            f"{source}: datasets cannot read {hub_source.repo_id} at commit {folder.name} ({_describe(error)}). "
            f"Check that datasets.load_dataset({hub_source.repo_id!r}, revision={folder.name!r}) loads it."
        ) from None
    split = _choose_split(source, hub_source, list(splits))
    table = splits[split].with_format("arrow")[:]
    rows, locations = read_arrow_rows(f"{HUB_PREFIX}{hub_source.repo_id}:{split}", table)
    return source, rows, locations, folder.name


def _malformed(text: str, problem: str) -> NoReturn:
    raise EvalSetError(f"{text}: not a Hub eval set source: {problem}. Write it as {SOURCE_FORM}.")


def _repo_id_problem(repo_id: str) -> str | None:
    """Why `repo_id` is not a Hub dataset id (`name` or `org/name`), or None when it is one."""
    parts = repo_id.split("/")
    if len(parts) > 2:
        return f"the dataset {repo_id!r} has more than one '/'; it is 'name' or 'org/name'"
    for part in parts:
        if not _REPO_PART.fullmatch(part):
            return f"{part!r} in the dataset name must be 1-96 letters, digits, '_', '.' or '-'"
        if "--" in part or ".." in part or part[0] in "-." or part[-1] in "-.":
            return f"{part!r} in the dataset name must not hold '--' or '..' nor start or end with '-' or '.'"
    return None


def _import_datasets(source: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise EvalSetError(
            f'{source}: reading an eval set from the Hub needs the datasets library. Run: pip install "pytest-dpo[hub]"'
        ) from None
    return datasets


def _snapshot_folder(source: str, hub_source: HubSource) -> Path:
    """The `snapshots/<sha>` folder of the dataset at the revision, downloaded or found in the cache."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, revision = hub_source.repo_id, hub_source.revision
    page = f"{constants.ENDPOINT}/datasets/{repo_id}"
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", revision=revision))
    except GatedRepoError:
        raise EvalSetError(
            f"{source}: the dataset {repo_id} is gated. "
            f"Accept its conditions on {page} and log in with `hf auth login`."
        ) from None
    except RepositoryNotFoundError:
        raise EvalSetError(
            f"{source}: dataset {repo_id} not found on the Hub (or it is private and your token cannot read it). "
            "Check the name, or log in with `hf auth login`."
        ) from None
    except RevisionNotFoundError:
        raise EvalSetError(
            f"{source}: dataset {repo_id} has no revision {revision!r}. "
            f"Use one of its branches, tags or commit shas (see {page}/tree/main)."
        ) from None
    except LocalEntryNotFoundError as error:
        if constants.HF_HUB_OFFLINE:
            raise EvalSetError(_not_in_cache(source, hub_source, Path(constants.HF_HUB_CACHE))) from None
        raise EvalSetError(
            f"{source}: the Hub cannot be reached and the dataset is not in the local cache ({_describe(error)}). "
            "Check your connection and HF_ENDPOINT, then try again."
        ) from None
    except Exception as error:  # the client raises many unrelated types (HTTP, validation, OS errors)
        raise EvalSetError(
            f"{source}: cannot be read from the Hub ({_describe(error)}). Check the dataset name, the revision, "
            "your connection and your token (`hf auth login`)."
        ) from None


def _not_in_cache(source: str, hub_source: HubSource, cache: Path) -> str:
    repo_id, revision = hub_source.repo_id, hub_source.revision
    prefetch = f"hf download --repo-type dataset {repo_id}"
    if revision != DEFAULT_REVISION:
        prefetch += f" --revision {revision}"
    cached_repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    missing = f"revision {revision!r} of dataset {repo_id} is" if cached_repo.is_dir() else f"dataset {repo_id} is"
    return (
        f"{source}: {missing} not (fully) in the local Hugging Face cache ({cache}), and HF_HUB_OFFLINE is set. "
        f"Prefetch it while online with `{prefetch}`, or unset HF_HUB_OFFLINE."
    )


def _choose_split(source: str, hub_source: HubSource, splits: list[str]) -> str:
    """The split asked for; else `test` when there is one; else the only split."""
    if hub_source.split is not None:
        if hub_source.split in splits:
            return hub_source.split
        raise EvalSetError(
            f"{source}: dataset {hub_source.repo_id} has no split {hub_source.split!r}; its splits: "
            f"{', '.join(splits)}. Name one, e.g. {HUB_PREFIX}{hub_source.repo_id}:{splits[0]}."
        )
    if DEFAULT_SPLIT in splits:
        return DEFAULT_SPLIT
    if len(splits) == 1:
        return splits[0]
    raise EvalSetError(
        f"{source}: dataset {hub_source.repo_id} has no {DEFAULT_SPLIT!r} split but several others: "
        f"{', '.join(splits)}. Name one, e.g. {HUB_PREFIX}{hub_source.repo_id}:{splits[0]}."
    )


def _describe(error: Exception) -> str:
    """An exception's type and message on one line."""
    return f"{type(error).__name__}: {' '.join(str(error).split()).rstrip('.')}"
