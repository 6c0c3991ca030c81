"""Gated publishing: save passing checkpoints atomically and push each as one Hub commit.

Decides nothing about who passed: it is handed the releases. A crash while
saving never leaves a half-written checkpoint under its final name; a failed
push leaves the remote as it was before that checkpoint (Hub commits are
atomic and each checkpoint is exactly one commit).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import PublishConfig
from .release import Release, release_files
from .spelling import option


class PublishError(RuntimeError):
    """Saving or pushing failed; the message says what is where now and what to do."""


@dataclass
class PublicationReport:
    """What publishing did, line by line, and the error that stopped it, if any."""

    lines: list[str] = field(default_factory=list)
    error: str | None = None


def save_release(release: Release, save_dir: Path) -> Path:
    """Write the release into `save_dir/<checkpoint>` atomically: a temporary folder next to it, then a rename.

    Raises:
        PublishError: the folder cannot be written (the message names it); nothing is left under the final name.
    """
    target = save_dir / release.folder_name
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{_owner()}-", dir=target.parent))
        staging.chmod(0o755)  # mkdtemp's 0700 would carry over to the released folder
    except OSError as error:
        raise PublishError(f"cannot write to save dir {save_dir}: {error.strerror}. Choose a writable {option('save_dir')}.") from None
    try:
        _write_files(release_files(release), staging)
        _replace(staging, target)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise PublishError(
            f"saving {release.checkpoint_id} into {target} failed: {error.strerror or error}. Nothing was left "
            "under that name; free space or fix permissions and run again."
        ) from None
    return target


def _write_files(files: dict[str, Path | bytes], folder: Path) -> None:
    for relative, content in files.items():
        destination = folder / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, destination)
        else:
            destination.write_bytes(content)
        with destination.open("rb") as handle:
            os.fsync(handle.fileno())


def _replace(staging: Path, target: Path) -> None:
    """Move `staging` to `target`, replacing an older save of the same checkpoint only once the new one is whole."""
    if not target.exists():
        staging.rename(target)
        return
    retired = target.with_name(f".{target.name}.replaced-{_owner()}")
    target.rename(retired)
    staging.rename(target)
    shutil.rmtree(retired, ignore_errors=True)


def _owner() -> str:
    """This process in a leftover's name: its pid and a digest of its host (a save dir may be shared)."""
    return f"{os.getpid()}-{hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]}"


def _remove_abandoned(target: Path) -> None:
    """Delete the staging and retired folders of `target` that killed runs on this host left behind.

    A folder whose process still runs (a concurrent save) or that another host made is left alone.
    """
    host = _owner().split("-")[1]
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:partial|replaced)-(?P<pid>\d+)-(?P<host>[0-9a-f]{{8}})(?:-.*)?")
    for leftover in target.parent.glob(f".{target.name}.*"):
        match = pattern.fullmatch(leftover.name)
        if match and match["host"] == host and not _running(int(match["pid"])):
            shutil.rmtree(leftover, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def plan_text(releases: Sequence[Release], config: PublishConfig) -> list[str]:
    """What saving and pushing would do, line by line (the dry run)."""
    if not releases:
        return ["no checkpoint passed: nothing would be saved or pushed"]
    lines = []
    for release in releases:
        lines.append(f"{release.checkpoint_id}: {release.commit_message}")
        if config.save_dir:
            lines.append(f"  would save into {Path(config.save_dir) / release.folder_name}")
        if config.push_to:
            target = "a pull request on" if config.push_pr else "branch"
            tag = "" if config.no_tag else f", tag {release.tag}"
            lines.append(f"  would push one commit to {config.push_to} ({target} {config.push_revision}{tag})")
        lines.extend(f"    {name}" for name in release_files(release))
    return lines


def publish(releases: Sequence[Release], config: PublishConfig, say: Callable[[str], None] = lambda line: None) -> PublicationReport:
    """Save and push the releases, in order. Stops at the first failure, which the report carries.

    A dry run only describes. Saving happens for every release before any
    push, so a push failure never loses a local save.
    """
    report = PublicationReport()

    def note(line: str) -> None:
        report.lines.append(line)
        say(line)

    if config.dry_run:
        for line in ["dry run: nothing is saved or pushed", *plan_text(releases, config)]:
            note(line)
        return report
    if not releases:
        note("no checkpoint passed: nothing saved or pushed")
        return report
    folders: dict[str, Path] = {}
    try:
        if config.save_dir:
            for release in releases:
                folders[release.checkpoint_id] = save_release(release, Path(config.save_dir))
                note(f"saved {release.checkpoint_id} into {folders[release.checkpoint_id]}")
        if config.push_to:
            with _bounded_hub_requests(config.push_timeout):
                _push_all(releases, config, folders, note)
    except PublishError as error:
        report.error = _scrub(str(error))
        note(f"error: {report.error}")
    return report


def _push_all(releases: Sequence[Release], config: PublishConfig, folders: dict[str, Path], note: Callable[[str], None]) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RevisionNotFoundError

    api = HfApi()
    repo_id = config.push_to or ""
    try:
        api.create_repo(repo_id, exist_ok=True, private=config.private or None)
        try:
            head = None if config.push_pr else api.repo_info(repo_id, revision=config.push_revision, timeout=config.push_timeout).sha
        except RevisionNotFoundError:
            head = None
        tags = {ref.name: ref.target_commit for ref in api.list_repo_refs(repo_id).tags} if not config.no_tag else {}
    # Not only HfHubHTTPError: the client lets its HTTP library's own errors (timeouts, resets) through.
    except Exception as error:
        raise PublishError(
            f"cannot reach or create Hub repo {repo_id}: {_first_line(error)}. {_what_to_do(error, config)} "
            "Nothing was pushed."
        ) from None
    pushed = []
    for release in releases:
        commit = None
        try:
            if release.tag in tags:
                # An earlier run (perhaps killed before its end) released it: running again completes the release.
                _check_released_before(api, repo_id, release, tags[release.tag])
                note(f"{release.checkpoint_id} is already on {repo_id} (tag {release.tag}): not pushed again")
                continue
            with _release_folder(release, folders.get(release.checkpoint_id)) as folder:
                commit = _commit(api, repo_id, folder, release, config, head)
            if not config.push_pr:
                head = commit.oid
            if not config.no_tag:
                api.create_tag(repo_id, tag=release.tag, revision=commit.oid, tag_message=release.commit_message)
        except Exception as error:
            done = f"pushed before it: {', '.join(pushed)}" if pushed else "nothing was pushed before it"
            saved = f"; the local save stays in {folders[release.checkpoint_id]}" if release.checkpoint_id in folders else ""
            if commit is not None:
                outcome = (
                    f"Its commit {commit.oid[:12]} was made but not tagged {release.tag} ({done}){saved}; "
                    "running again tags it."
                )
            elif _timed_out(error):
                outcome = (
                    f"Whether that checkpoint's commit landed is unknown ({done}){saved}. Check the repo's history, "
                    "then run again."
                )
            else:
                outcome = f"That checkpoint's commit was not made, so the remote is as it was before it ({done}){saved}."
            raise PublishError(
                f"pushing {release.checkpoint_id} to {repo_id} failed: {_first_line(error)}. {outcome} "
                f"{_what_to_do(error, config)}"
            ) from None
        pushed.append(release.checkpoint_id)
        where = commit.pr_url if config.push_pr else f"{config.push_revision}@{commit.oid[:12]}"
        note(f"pushed {release.checkpoint_id} to {repo_id} ({where})")


def _commit(api: Any, repo_id: str, folder: Path, release: Release, config: PublishConfig, head: str | None) -> Any:
    from huggingface_hub import CommitOperationAdd

    operations = [
        CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    ]
    return api.create_commit(
        repo_id,
        operations,
        commit_message=release.commit_message,
        commit_description=release.commit_description,
        revision=config.push_revision,
        parent_commit=head,
        create_pr=config.push_pr,
    )


def _check_released_before(api: Any, repo_id: str, release: Release, oid: str) -> None:
    """Raise ValueError unless commit `oid` (the release's tag) holds the checkpoint's own files unchanged.

    Only the files copied from the checkpoint are compared: the card and `dpo_eval.json` also record
    versions and paths, which may differ from the earlier run's.
    """
    from huggingface_hub.utils.sha import git_hash, sha_fileobj

    siblings = api.repo_info(repo_id, revision=oid, files_metadata=True).siblings or []
    remote = {sibling.rfilename: sibling for sibling in siblings}
    for name, source in release_files(release).items():
        if not isinstance(source, Path):
            continue
        sibling = remote.get(name)
        if sibling is not None and sibling.lfs is not None:
            with source.open("rb") as handle:
                same = sha_fileobj(handle).hex() == sibling.lfs.sha256
        else:
            same = sibling is not None and sibling.blob_id == git_hash(source.read_bytes())
        if not same:
            raise ValueError(
                f"tag {release.tag} already exists on {repo_id} and its {name} is not this checkpoint's (commit "
                f"{oid[:12]}): delete that tag, push to another repo, or pass {option('no_tag')}"
            )


@contextmanager
def _release_folder(release: Release, saved: Path | None) -> Iterator[Path]:
    """The saved folder of a release, or a temporary one written the same way and removed afterwards."""
    if saved is not None:
        yield saved
        return
    with tempfile.TemporaryDirectory(prefix="pytest-dpo-push-") as name:
        _write_files(release_files(release), Path(name))
        yield Path(name)


@contextmanager
def _bounded_hub_requests(seconds: float) -> Iterator[None]:
    """Let each Hub request wait at most `seconds` for an answer; huggingface_hub's shared client waits forever."""
    from huggingface_hub import get_session

    session = get_session()
    previous = getattr(session, "timeout", None)
    session.timeout = seconds
    try:
        yield
    finally:
        session.timeout = previous


def _timed_out(error: BaseException) -> bool:
    # Each HTTP library huggingface_hub has used names its timeout class *Timeout*; none derives from TimeoutError.
    return any("Timeout" in cls.__name__ for cls in type(error).__mro__)


def _what_to_do(error: BaseException, config: PublishConfig) -> str:
    """The fix for a failed Hub request, judged by its HTTP status."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    if _timed_out(error):
        return f"The Hub did not answer within {config.push_timeout:g} s: retry later, or raise {option('push_timeout')}."
    if status == 401:
        return "The Hub refused the token: log in with `hf auth login` or set HF_TOKEN to a valid token."
    if status == 403:
        namespace = (config.push_to or "").split("/")[0]
        return f"The token may not write to {namespace}: use a token with write access there, or push to your own namespace."
    if status is not None and (status == 429 or status >= 500):
        return "The Hub failed on its side: run again later."
    return "Fix the cause and run again."


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0].rstrip(".") if text else type(error).__name__


def _scrub(text: str) -> str:
    """Remove the Hub token from a message, whatever path it took there."""
    from huggingface_hub import get_token

    token = get_token()
    return text.replace(token, "***") if token else text
