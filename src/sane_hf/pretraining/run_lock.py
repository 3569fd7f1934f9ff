"""One pretraining run per output folder at a time.

Two runs writing one ``output_dir`` (two terminals, the same job started twice, a
``--resume-from-checkpoint latest`` while the first still runs) would interleave their lines in
``metrics.jsonl`` and delete each other's ``checkpoint-<step>.partial`` folders. The main process
holds the folder's lock file (`PRETRAINING_LOCK_FILE`, an OS lock released when its process
dies) for the whole run; a second run is refused at once, as a second writer of a zoo folder is
(`sane_hf.zoo.formats.zoo_writer_lock`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

from sane_hf.pretraining.config import PretrainingConfig
from sane_hf.zoo.formats import PRETRAINING_LOCK_FILE, zoo_writer_lock

# Output folders this process holds: the recipe's lock covers the run and its probe heads, and
# the run inside it must not refuse its own caller.
_HELD: set[Path] = set()


@contextlib.contextmanager
def pretraining_run_lock(config: PretrainingConfig) -> Iterator[None]:
    """Hold ``config.output_dir``'s lock for a run: the launcher's rank 0 (``RANK``) takes it
    and keeps it until every process is done.

    A config without a dataset is refused first, before the output folder is created. Raises
    `ZooBusyError` (one line) on rank 0 when another run holds the folder; the launcher
    (``torchrun``, ``accelerate launch``) then stops the other processes, which have not
    written anything yet. No process group is needed for that, so the lock can be taken
    before Accelerate sets the processes up.
    """
    if config.dataset is None:
        raise ValueError("no dataset: set `dataset` (--dataset PATH) to a zoo dataset folder")
    folder = Path(config.output_dir).resolve()
    if folder in _HELD:
        yield
        return
    with contextlib.ExitStack() as stack:
        if int(os.environ.get("RANK", "0")) == 0:
            stack.enter_context(zoo_writer_lock(folder, PRETRAINING_LOCK_FILE))
        _HELD.add(folder)
        try:
            yield
            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # rank 0 keeps the lock until all processes are done
        finally:
            _HELD.discard(folder)
