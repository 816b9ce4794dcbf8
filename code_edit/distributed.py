"""Several processes on one editing run (torchrun): rank and world size from torchrun's environment,
torch.distributed's key-value store for the few control messages, the round-robin shard of the units
still to do, and each rank's GPU. Without torchrun's environment (or with WORLD_SIZE=1) nothing here
talks to anyone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence, TypeVar

T = TypeVar("T")

# The control messages are a few pickled objects (the plan, the units to do, failure counts); no tensor
# crosses devices. They go through the TCP key-value store that torchrun's rendezvous provides (the one
# process groups are built on), not through a gloo process group: a store client has no threads of its own,
# while a gloo group can abort a rank at exit (SIGABRT) on small CPU machines.
# A rank waits for a message up to TIMEOUT: the final gather waits for the slowest rank, which can be
# a long case behind (a rank that dies is torchrun's business: it stops the others).
TIMEOUT = dt.timedelta(hours=72)
PREFIX = "code_edit"


@dataclass
class Ranks:
    """This process's place in the run: rank r of `world` processes, `local_rank` on its host; with
    several, the store that carries their messages (keys numbered by the messages so far, which every
    rank exchanges in the same order)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    store: Any = field(default=None, compare=False, repr=False)
    sent: int = field(default=0, compare=False, repr=False)

    def _key(self, kind: str) -> str:
        self.sent += 1
        return f"{kind}/{self.sent}"

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        key = self._key("broadcast")
        if self.rank == 0:
            self.store.set(key, pickle.dumps(obj))
            return obj
        return pickle.loads(self.store.get(key))  # waits until rank 0 has set it

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, by rank, on every rank (also a barrier)."""
        if self.world == 1:
            return [obj]
        key = self._key("gather")
        self.store.set(f"{key}/{self.rank}", pickle.dumps(obj))
        return [pickle.loads(self.store.get(f"{key}/{r}")) for r in range(self.world)]


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
def run_ranks() -> Iterator[Ranks]:
    """The ranks of this run; with WORLD_SIZE > 1 connected to the run's store for the duration (torchrun's
    agent store, or one rank 0 hosts: torch.distributed's env:// rendezvous, as init_process_group uses)."""
    ranks = env_ranks()
    if ranks.world == 1:
        yield ranks
        return
    import torch.distributed as tdist

    store, rank, world = next(tdist.rendezvous("env://", timeout=TIMEOUT))
    if (rank, world) != (ranks.rank, ranks.world):
        raise ValueError(f"env:// rendezvous gave rank {rank} of {world}, the environment {ranks.rank} of {ranks.world}")
    ranks.store = tdist.PrefixStore(PREFIX, store)
    try:
        yield ranks
    finally:
        ranks.store = None


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


def execute_ranked(args: Any, editor_factory: Any = None) -> Any:
    """The run across the ranks: rank 0 plans, opens the run folder (lock, meta, journal repair) and sends
    the plan and the units still to do to the others; every rank edits its round-robin share into its own
    journal; when all are done rank 0 merges the journals into metrics.json and res.json."""
    from code_edit.run import conclude, edit_units, open_run, run_logging
    from code_edit.run_folder import RunError

    with run_ranks() as ranks, contextlib.ExitStack() as stack:
        # 1) rank 0 opens the run; every other rank checks it sees the run folder
        if ranks.rank == 0:
            try:
                start, info = open_run(args, ranks, stack)
            except Exception as e:
                ranks.broadcast(f"{type(e).__name__}: {e}")  # the others stop too, with the reason
                ranks.gather(None)  # once they have it: rank 0's exit makes torchrun stop a rank still starting
                raise
            ranks.broadcast(start)
            problem = None
        else:
            start, info = ranks.broadcast(), {}
            if isinstance(start, str):
                ranks.gather(None)
                raise RunError(f"rank 0 could not start the run: {start}")
            problem = None if (start.run_dir / "requests.json").exists() else (
                f"cannot see {start.run_dir / 'requests.json'}, written by rank 0: --output_root must be on a "
                f"filesystem that every host shares")
            if problem is None:
                stack.enter_context(run_logging(start.run_dir, ranks))
        problems = [f"rank {r}: {m}" for r, m in enumerate(ranks.gather(problem)) if m]
        if problems:
            raise RunError("; ".join(problems))
        # 2) each rank its share of the units
        todo = set(start.todo)
        mine = shard([u for u in start.p.units if u.key in todo], ranks.rank, ranks.world)
        failures = edit_units(args, start.p, start.run_dir, mine, ranks, info, editor_factory)
        failures = sum(ranks.gather(failures))  # waits for every rank
        # 3) rank 0 merges
        if ranks.rank == 0:
            conclude(start, info, failures)
        return start.run_dir
