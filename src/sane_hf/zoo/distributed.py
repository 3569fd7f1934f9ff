"""Zoo training across processes: ``torchrun``/``accelerate launch -m sane_hf zoo train ...``.

A launcher starts one process per GPU (or CPU share) with ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``
set; `zoo_processes` joins them into a process group (gloo: the processes only exchange a few
flags, never tensors of the models, so the same backend serves CPU and GPU runs). The chunks of
a zoo are planned from the config alone and dealt to the ranks round-robin, and every model's
seed, data order and dropout masks depend on its chunk, never on the rank, so a zoo trained by
N processes is byte-identical to one trained by one process.

The zoo folder's writer lock (`sane_hf.zoo.formats.zoo_writer_lock`) is held by rank 0 for the
whole run, so a second run on the folder is refused on every rank; the ranks of one run update
``metadata.jsonl`` one at a time under a short metadata lock.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from sane_hf.zoo.formats import ZooBusyError, zoo_writer_lock


@dataclass(frozen=True)
class Ranks:
    """This process' place in the run: ``rank`` of ``world`` processes (``0`` of ``1`` alone)."""

    rank: int = 0
    world: int = 1

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_agree(self, ok: bool) -> bool:
        """True on every rank if ``ok`` is true on every rank."""
        if self.world == 1:
            return ok
        flag = torch.tensor([int(ok)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def device(self, device: str) -> torch.device:
        """``cuda`` means this process' own GPU (``LOCAL_RANK``) when several processes run."""
        resolved = torch.device(device)
        if self.world > 1 and resolved.type == "cuda" and resolved.index is None:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return resolved


@contextlib.contextmanager
def zoo_processes() -> Iterator[Ranks]:
    """The run's `Ranks`: a process group when a launcher started several processes (joined
    here unless the caller already did, and left again at the end), else a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not dist.is_initialized():
        yield Ranks()
        return
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend="gloo")
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size())
    finally:
        if created:
            dist.destroy_process_group()


@contextlib.contextmanager
def run_lock(folder: Path, ranks: Ranks) -> Iterator[None]:
    """The zoo folder's writer lock for a run of ``ranks``: taken by rank 0, refused on all ranks
    (`ZooBusyError`) when another run holds it, released when every rank is done."""
    if ranks.world == 1:
        with zoo_writer_lock(folder):
            yield
        return
    with contextlib.ExitStack() as stack:
        refusal = None
        if ranks.rank == 0:
            try:
                stack.enter_context(zoo_writer_lock(folder))
            except ZooBusyError as error:
                refusal = error
        if not ranks.all_agree(refusal is None):
            raise refusal or ZooBusyError(
                f"{folder} is being written by another process (rank 0 could not take its lock)"
            )
        yield
        ranks.barrier()  # rank 0 keeps the lock until every rank has finished


def my_share(items: list, ranks: Ranks) -> list:
    """The items of this rank: round-robin, so the assignment depends only on the plan."""
    return items[ranks.rank :: ranks.world]
