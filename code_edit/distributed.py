"""Several processes on one editing run (torchrun): rank and world size from torchrun's environment,
a gloo process group for the few control messages, the round-robin shard of the units still to do,
and each rank's GPU. Without torchrun's environment (or with WORLD_SIZE=1) nothing here talks to anyone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence, TypeVar

T = TypeVar("T")

# The control messages are a few pickled objects (the plan, the units to do, failure counts); no tensor
# crosses devices, so gloo serves CPU and CUDA runs alike and needs no NCCL communicator or GPU memory.
# The final gather waits for the slowest rank, which can be a long case behind: hence a long timeout
# (a rank that dies is torchrun's business: it stops the others).
BACKEND = "gloo"
TIMEOUT = dt.timedelta(hours=72)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank r of `world` processes, `local_rank` on its host."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as tdist

        box = [obj if self.rank == 0 else None]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, by rank, on every rank (also a barrier)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as tdist

        out: list[Any] = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out


def env_ranks() -> Ranks:
    """Rank, world size and local rank as torchrun sets them (RANK, WORLD_SIZE, LOCAL_RANK)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return Ranks()
        return Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    except (KeyError, ValueError) as e:
        raise ValueError(f"torchrun environment: WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} needs integer RANK and "
                         f"LOCAL_RANK ({e})") from None


@contextlib.contextmanager
def process_group() -> Iterator[Ranks]:
    """The ranks of this run; with WORLD_SIZE > 1 a gloo process group lives for the duration."""
    ranks = env_ranks()
    if ranks.world == 1:
        yield ranks
        return
    import torch.distributed as tdist

    created = not tdist.is_initialized()
    if created:
        tdist.init_process_group(BACKEND, timeout=TIMEOUT)
    try:
        yield ranks
    finally:
        if created:
            tdist.destroy_process_group()


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Item i goes to rank i % world: deterministic, and every item to exactly one rank."""
    return list(items[rank::world])


def rank_device(requested: str, ranks: Ranks | None = None) -> Any:
    """The device this rank edits on: `requested`, except that with several processes a plain `cuda`
    means cuda:LOCAL_RANK (cpu or an explicit cuda:N is kept: then the ranks share it)."""
    import torch

    ranks = ranks or env_ranks()
    device = torch.device(requested)
    if ranks.world > 1 and device.type == "cuda" and device.index is None:
        n = torch.cuda.device_count()
        if ranks.local_rank >= n:
            raise ValueError(f"LOCAL_RANK {ranks.local_rank} but {n} CUDA device(s) visible on this host: start at "
                             f"most {n} processes per host (torchrun --nproc_per_node {n})")
        device = torch.device("cuda", ranks.local_rank)
    if ranks.world > 1 and device.type == "cuda":
        torch.cuda.set_device(device)  # allocations without an explicit device land on this rank's GPU
    return device
