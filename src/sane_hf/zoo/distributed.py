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

Progress: one bar, on rank 0, with the total of all ranks (`RunProgress`), and the same for the
worker processes of a parallel dataset build (`shared_progress`). A rank that fails posts its
error, so the other ranks stop with it instead of waiting for work that will never come; what
every rank committed before stays committed (a rerun resumes from it).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import itertools
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import multiprocess
import multiprocess.managers
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

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

    def all_gather(self, value: object) -> list:
        """Every rank's ``value`` (picklable, CPU tensors), in rank order, on every rank."""
        if self.world == 1:
            return [value]
        values: list = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def from_rank_0(self, value: object) -> object:
        """Rank 0's ``value`` on every rank (what the other ranks pass is ignored)."""
        if self.world == 1:
            return value
        values = [value]
        dist.broadcast_object_list(values, src=0)
        return values[0]

    def device(self, device: str) -> torch.device:
        """``cuda`` means this process' own GPU (``LOCAL_RANK``) when several processes run."""
        resolved = torch.device(device)
        if self.world > 1 and resolved.type == "cuda" and resolved.index is None:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return resolved


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``: where sane-hf runs when no device is given."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def is_main_process() -> bool:
    """Whether this process writes results: the only one, or rank 0 of a launcher's processes
    (all of them hold the gathered result)."""
    return int(os.environ.get("RANK", "0")) == 0


def process_device(device: str | None) -> str | None:
    """``device`` for this process: under a launcher ``cuda`` means its own GPU (``LOCAL_RANK``),
    so processes that load a model before joining the group do not all pile onto GPU 0."""
    if device is None:
        return None
    return str(Ranks(0, int(os.environ.get("WORLD_SIZE", "1"))).device(device))


@contextlib.contextmanager
def zoo_processes() -> Iterator[Ranks]:
    """The run's `Ranks`: a process group when a launcher started several processes, else a
    single process.

    The group is joined on first use (unless the caller already did) and kept until the process
    exits: a group joined a second time through the launcher's store would read the first one's
    stale addresses there (gloo then fails to connect or hangs), and one command may well use it
    twice (sampling draws, then fine-tunes).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not dist.is_initialized():
        yield Ranks()
        return
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
        atexit.register(_leave_process_group)
    yield Ranks(dist.get_rank(), dist.get_world_size())


def _leave_process_group() -> None:
    if dist.is_initialized():
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


class WorkerReports(Protocol):
    """What the workers of a run report to: progress (``update``, sent on by ``flush`` at the
    latest) and their first error (``fail``), which `shared_progress`'s caller reads from
    ``errors``."""

    errors: list[str]

    def update(self, n: int = 1) -> object: ...

    def flush(self) -> None: ...

    def fail(self, message: str) -> None: ...


class RankFailedError(RuntimeError):
    """Another rank of the run failed; the message is its error."""


# Every rank calls train_zoo equally often, so the n-th run of each rank shares one counter.
_RUN_NUMBERS = itertools.count()


class RunProgress:
    """Rank 0's ``bar`` showing the steps of all ranks of a run, and a failed rank stopping the
    others (use as a context manager around the rank's work).

    Every rank adds its steps to a counter in the process group's key-value store (not a
    collective: the ranks are at different points of their work), at most every ``interval``
    seconds; rank 0 shows the sum. A rank that raises posts its error there, and the other ranks
    raise `RankFailedError` with it at their next report instead of waiting at a barrier for
    work that will never come. With one process it is the bar itself.
    """

    def __init__(self, bar: tqdm, ranks: Ranks, interval: float = 0.5):
        self.bar, self.ranks, self.interval = bar, ranks, interval
        self.store = None
        if ranks.world > 1:
            # The store the launcher set up for the group: no extra port or file needed.
            self.store = dist.distributed_c10d._get_default_store()
            key = f"sane_hf/run_{next(_RUN_NUMBERS)}"
            self.steps_key, self.failed_key = f"{key}/steps", f"{key}/failed"
        self.pending, self.flushed_at = 0, time.monotonic()

    def __enter__(self) -> RunProgress:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self.store is not None and error is not None and kind is not RankFailedError:
            message = f"rank {self.ranks.rank} failed: {kind.__name__}: {error}"
            self.store.set(self.failed_key, message.splitlines()[0])

    def update(self, n: int = 1) -> None:
        if self.store is None:
            self.bar.update(n)
            return
        self.pending += n
        if time.monotonic() - self.flushed_at >= self.interval:
            self._flush()

    def set_description(self, description: str) -> None:
        self.bar.set_description(description)

    def _flush(self) -> int:
        if self.store.check([self.failed_key]):
            raise RankFailedError(self.store.get(self.failed_key).decode())
        done = self.store.add(self.steps_key, self.pending)
        self.pending, self.flushed_at = 0, time.monotonic()
        if self.ranks.rank == 0:
            self.bar.n = done
            self.bar.refresh()
        return done

    def wait_for_all(self) -> None:
        """Wait until every rank has done its steps (rank 0's bar keeps moving meanwhile)."""
        if self.store is None:
            return
        while self._flush() < self.bar.total:
            time.sleep(self.interval)


class _LocalReports:
    """Reports of work done in this process: straight to the bar."""

    def __init__(self, bar: tqdm):
        self.bar, self.errors = bar, []

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def flush(self) -> None:
        pass

    def fail(self, message: str) -> None:
        self.errors.append(message)


class _ManagedReports:
    """Picklable reports for worker processes: counts go to the parent's bar through a queue
    (batched: every put is a round trip to the manager process), errors into a list (an
    exception loses its cause on its way back from a pool worker)."""

    def __init__(self, counts: queue.Queue | None, errors: list[str], interval: float = 0.2):
        self.counts, self.errors, self.interval = counts, errors, interval
        self.pending, self.sent_at = 0, 0.0

    def update(self, n: int = 1) -> None:
        self.pending += n
        if time.monotonic() - self.sent_at >= self.interval:
            self.flush()

    def flush(self) -> None:
        if self.counts is not None and self.pending:
            self.counts.put(self.pending)
        self.pending, self.sent_at = 0, time.monotonic()

    def fail(self, message: str) -> None:
        self.errors.append(message)  # synchronous: in the list before the worker raises


@contextlib.contextmanager
def shared_progress(
    total: int, description: str, show: bool, num_proc: int | None
) -> Iterator[WorkerReports]:
    """One bar in this process with the ``total``; with ``num_proc`` worker processes (a pool
    started later, e.g. by ``datasets``) the reports handed out are picklable and reach this
    process through a manager."""
    with tqdm(total=total, desc=description, disable=not show) as bar:
        if num_proc is None:
            yield _LocalReports(bar)
            return
        manager = multiprocess.managers.SyncManager()
        manager.start(die_with_parent)
        with manager:
            if not show:
                yield _ManagedReports(None, manager.list())
                return
            counts = manager.Queue()
            relay = threading.Thread(target=_relay, args=(counts, bar), daemon=True)
            relay.start()
            try:
                yield _ManagedReports(counts, manager.list())
            finally:
                counts.put(None)
                relay.join()


# linux/prctl.h: send this process a signal when the thread that started it ends
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """End this helper process (a progress manager, a pool worker) when the process that
    started it dies: a killed ``zoo build --num-proc N`` left its manager and workers running,
    about 350 MB each. Linux only (``PR_SET_PDEATHSIG``); elsewhere, and in a main process
    (a single-shard build runs in the caller's process), it does nothing."""
    if multiprocess.parent_process() is None:
        return
    _kill_me_with_my_parent(expected_parent=None)


def children_die_with_this_process() -> None:
    """From now on, every process forked by this one (and by its children) ends when its
    parent dies, including helpers it does not start itself: ``datasets`` starts its own
    manager process for ``num_proc`` builds, which `die_with_parent` cannot reach. Registered
    once per process (``os.register_at_fork``); Linux only, elsewhere it does nothing."""
    global _FORK_HOOK_REGISTERED
    if _FORK_HOOK_REGISTERED or not hasattr(os, "register_at_fork"):
        return
    _FORK_HOOK_REGISTERED = True
    os.register_at_fork(before=_remember_forking_process, after_in_child=_after_fork_in_child)


_FORK_HOOK_REGISTERED = False
_forking_process: int | None = None


def _remember_forking_process() -> None:
    global _forking_process
    _forking_process = os.getpid()


def _after_fork_in_child() -> None:
    _kill_me_with_my_parent(expected_parent=_forking_process)


def _kill_me_with_my_parent(expected_parent: int | None) -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    parent = os.getppid()
    if parent == 1 or (expected_parent is not None and parent != expected_parent):
        os._exit(1)  # the parent died before the request took effect


def _relay(counts: queue.Queue, bar: tqdm) -> None:
    while (n := counts.get()) is not None:
        bar.update(n)
