"""Sharded runs: every experiment, unchanged, under `torchrun`, `accelerate launch` or SLURM's `srun`.

A launcher starts N processes and tells each, in its environment, who it is: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`
(and `MASTER_ADDR`, `MASTER_PORT` for the rendezvous). `World.from_environment()` reads them — a process started
without them is rank 0 of 1, and nothing distributed happens — and `World.start()` joins the process group
(gloo on CPU, nccl on CUDA). The runner then

  - loads the model on the rank's own device (`cuda:LOCAL_RANK` where CUDA is present);
  - opens the run folder on rank 0 first (the config check and the folder's lock), and on the other ranks only
    once rank 0 has, taking its verdict: a run refused there is refused on every rank, with the same message;
  - gives each rank the units `i` with `i % N == rank` that are not done yet (`World.share`) — deterministic and
    disjoint, whatever was done before and by however many ranks — and every rank writes its own parts (one
    atomic file per unit) into the one shared folder;
  - waits at a barrier; then rank 0 alone collects the results, writes the summary and figure, logs to W&B and
    prints the report.

A rank that dies takes the job with it (the launcher stops the others); the parts written so far stay, so the
same command continues at any world size — one process included — and ends with the table an uninterrupted
single-process run writes.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from mmscope.errors import MMScopeError

T = TypeVar("T")
# Ranks wait at the final barrier for the slowest share: as long as a sweep may take, not gloo's 30 minutes.
BARRIER_TIMEOUT = datetime.timedelta(days=7)


class RankError(MMScopeError, RuntimeError):
    """What rank 0 refused, as the other ranks report it."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a launch (rank 0 of 1 without a launcher)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> World:
        """The rank, world size and local rank a launcher (torchrun, accelerate, srun with torchrun's variables)
        put in the environment."""
        values = {name: os.environ.get(name) for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        bad = [f"{name}={value!r}" for name, value in values.items()
               if value is not None and not value.strip().isdigit()]
        if bad:
            raise RankError(f"{', '.join(bad)}: a launcher sets these to whole numbers; unset them to run one process")
        size, rank = int(values["WORLD_SIZE"] or 1), int(values["RANK"] or 0)
        local = int(values["LOCAL_RANK"] or rank)
        if not 0 <= rank < size:
            raise RankError(f"RANK={rank} is outside WORLD_SIZE={size}")
        return cls(rank, size, local)

    @property
    def main(self) -> bool:
        """Whether this is rank 0: the one that writes the run's config, results and report."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.size > 1

    def device(self) -> str | None:
        """This rank's device: `cuda:LOCAL_RANK` when sharded on a CUDA machine; None (the default) otherwise."""
        return f"cuda:{self.local_rank}" if self.sharded and torch.cuda.is_available() else None

    def start(self) -> None:
        """Join the launch's process group (nccl on CUDA, gloo on CPU); nothing for one process."""
        if self.sharded and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend, rank=self.rank, world_size=self.size, timeout=BARRIER_TIMEOUT)

    def finish(self) -> None:
        """Leave the process group."""
        if self.sharded and dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self) -> None:
        """Wait until every rank has arrived."""
        if self.sharded:
            dist.barrier()

    def share(self, units: Sequence[int]) -> list[int]:
        """This rank's units among `units`: those whose index modulo the world size is its rank."""
        return [unit for unit in units if unit % self.size == self.rank]

    def first_on_main(self, make: Callable[[], T], follow: Callable[[], T]) -> T:
        """`make()` on rank 0, then `follow()` on the other ranks once rank 0 succeeded; a failure on rank 0
        (an mmscope error, which names the bad input) is raised on every rank, with its message."""
        if not self.sharded:
            return make()
        verdict: list[str | None] = [None]
        if self.main:
            try:
                result = make()
            except MMScopeError as error:
                verdict = [str(error)]
                dist.broadcast_object_list(verdict, src=0)
                raise
            dist.broadcast_object_list(verdict, src=0)
            return result
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            raise RankError(verdict[0])
        return follow()
