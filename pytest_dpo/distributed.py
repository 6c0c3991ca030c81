"""torchrun scale-out: every rank runs the whole pytest session and scores a shard of the eval set.

Under `torchrun` (`WORLD_SIZE` > 1) each process runs the same checkpoints and
tests. Only scoring is split: each rank scores its shard of the rows, the
shards are gathered to every rank and put back in eval-set order, so every
rank computes the same metrics and reaches the same verdicts. Rank 0 alone
writes shared files (lock, score cache, reports) and publishes.

Reading the environment needs only the standard library; torch is imported
when the process group starts or scores are reassembled.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, TypeVar

from .options import ConfigError
from .spelling import option

if TYPE_CHECKING:
    from .results import SequenceScores

T = TypeVar("T")
K = TypeVar("K")
REQUIRED_ENV = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class RankFailed(RuntimeError):
    """Another rank failed while this one waited for its shard; the message names the rank and its error."""


def world_from_env(environ: Mapping[str, str] = os.environ) -> World | None:
    """The torchrun world this process belongs to, or None outside torchrun (`WORLD_SIZE` unset or 1).

    Raises:
        ConfigError: `WORLD_SIZE` > 1 but a variable torchrun sets is missing or not a number.
    """
    if int(_read(environ, "WORLD_SIZE", "1")) <= 1:
        return None
    missing = [name for name in REQUIRED_ENV if name not in environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={environ['WORLD_SIZE']} is set but not {', '.join(missing)}: launch pytest with "
            "`torchrun --nproc-per-node N -m pytest …`, which sets them, or unset WORLD_SIZE for a single process."
        )
    return World(
        rank=int(_read(environ, "RANK")),
        world_size=int(_read(environ, "WORLD_SIZE")),
        local_rank=int(_read(environ, "LOCAL_RANK")),
    )


def _read(environ: Mapping[str, str], name: str, default: str | None = None) -> str:
    value = environ.get(name, default) or ""
    if not value.strip().isdigit():
        raise ConfigError(f"environment variable {name}={value!r} is not a whole number; torchrun sets it, so launch with torchrun.")
    return value


def shard_positions(lengths: Sequence[int], rank: int, world_size: int) -> list[int]:
    """The positions of the rows that `rank` scores, ascending.

    Rows are ranked by length and dealt out in turn, so every rank gets rows of
    every length: the ranks finish together, and each one's length-sorted
    batches stay as tight as a single process's.

    Args:
        lengths (`Sequence[int]`): each row's scored length in tokens, in eval-set order.
        rank (`int`): this process's rank, `0 <= rank < world_size`.
        world_size (`int`): the number of ranks.

    Example:
        >>> shard_positions([5, 9, 1, 7, 3], rank=0, world_size=2)
        [1, 4]
    """
    by_length = sorted(range(len(lengths)), key=lambda position: (-lengths[position], position))
    return sorted(by_length[rank::world_size])


def reassemble(shards: Sequence[tuple[Sequence[int], SequenceScores]], total: int) -> SequenceScores:
    """Every rank's `(positions, scores)` put back together as one `SequenceScores` in eval-set order.

    Raises:
        RankFailed: the shards do not cover each of the `total` rows exactly once
            (the ranks tokenized different eval sets).
    """
    import torch

    from .results import SequenceScores

    covered = sorted(position for positions, _ in shards for position in positions)
    if covered != list(range(total)):
        raise RankFailed(
            f"the ranks' shards cover {len(covered)} row slots instead of each of the {total} rows once: the ranks "
            "read different eval sets or tokenizers. Give every node the same files."
        )
    columns = {}
    for column in fields(SequenceScores):
        first = getattr(shards[0][1], column.name)
        if first is None:
            continue
        merged = first.new_empty((total, *first.shape[1:]))
        for positions, scores in shards:
            merged[torch.tensor(positions, dtype=torch.long)] = getattr(scores, column.name)
        columns[column.name] = merged
    return SequenceScores(**columns)


@dataclass
class World:
    """This process's place among the torchrun ranks, and the collectives pytest-dpo needs.

    Args:
        rank (`int`): the global rank (`RANK`); rank 0 writes files and publishes.
        world_size (`int`): how many ranks score the eval set together (`WORLD_SIZE`).
        local_rank (`int`): the rank on this node (`LOCAL_RANK`); picks the GPU, `cuda:LOCAL_RANK`.
    """

    rank: int
    world_size: int
    local_rank: int
    owns_group: bool = field(default=False, init=False, repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def start(self) -> None:
        """Select this rank's GPU and start the default process group (nccl with CUDA, else gloo) unless one runs."""
        import torch
        import torch.distributed as dist

        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank % torch.cuda.device_count())
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
            self.owns_group = True

    def stop(self) -> None:
        """Destroy the process group if `start` created it."""
        import torch.distributed as dist

        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False

    def gather(self, value: T) -> list[T]:
        """`value` from every rank, in rank order, on every rank."""
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def on_main(self, compute: Callable[[], T]) -> T:
        """Run `compute` on rank 0 only and hand every rank its value, or raise its exception on every rank."""
        import torch.distributed as dist

        outcome: list[Any] = [None]
        if self.is_main:
            try:
                outcome[0] = (compute(), None)
            except Exception as error:
                outcome[0] = (None, error)
        dist.broadcast_object_list(outcome, src=0)
        value, error = outcome[0]
        if error is not None:
            raise error
        return value

    def check_same(self, what: str, value: object) -> None:
        """Raise `ConfigError` on every rank unless all ranks hold the same `value` (`what` names it)."""
        values = self.gather(value)
        differing = [rank for rank, other in enumerate(values) if other != values[0]]
        if differing:
            raise ConfigError(
                f"torchrun ranks {differing} see other {what} than rank 0: every rank must read the same "
                f"{option('checkpoint')} and {option('eval_set')} files (on several nodes: the same paths with the same content)."
            )

    def score_parts(
        self,
        lengths: Mapping[K, Sequence[int]],
        score_rows: Callable[[dict[K, list[int]]], dict[K, dict[str, SequenceScores]]],
    ) -> dict[K, dict[str, SequenceScores]]:
        """Score this rank's shard of every part (an eval set's rows) with one `score_rows({part: positions})`
        call, and return every rank's shards reassembled per part and role.

        If any rank fails, every rank raises: the failing rank its own error,
        the others `RankFailed` naming it, so no rank waits for a shard that never comes.
        """
        positions = {part: shard_positions(part_lengths, self.rank, self.world_size) for part, part_lengths in lengths.items()}
        try:
            mine: dict[K, dict[str, SequenceScores]] | str = score_rows(positions)
            error = None
        except Exception as raised:
            mine, error = f"{type(raised).__name__}: {raised}", raised
        everything = self.gather((positions, mine))
        if error is not None:
            raise error
        failures = [f"rank {rank}: {scores}" for rank, (_, scores) in enumerate(everything) if isinstance(scores, str)]
        if failures:
            raise RankFailed(f"scoring failed on {'; '.join(failures)}")
        merged: dict[K, dict[str, SequenceScores]] = {}
        for part, part_lengths in lengths.items():
            shards = [(shard[part], scores[part]) for shard, scores in everything if shard[part]]
            roles = {role for _, by_role in shards for role in by_role}
            merged[part] = {
                role: reassemble([(rows, by_role[role]) for rows, by_role in shards], len(part_lengths)) for role in roles
            }
        return merged
