"""One pretraining run per output folder at a time.

Two runs writing one ``output_dir`` (two terminals, the same job started twice, a
``--resume-from-checkpoint latest`` while the first still runs) would interleave their lines in
``metrics.jsonl`` and delete each other's ``checkpoint-<step>.partial`` folders. The main process
holds the folder's lock file (`PRETRAINING_LOCK_FILE`, an OS lock released when its process
dies) for the whole run; a second run is refused at once on every process, as a second writer of
a zoo folder is (`sane_hf.zoo.formats.zoo_writer_lock`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from sane_hf.pretraining.config import PretrainingConfig
from sane_hf.zoo.formats import PRETRAINING_LOCK_FILE, ZooBusyError, zoo_writer_lock

# Output folders this process holds: the recipe's lock covers the run and its probe heads, and
# the run inside it must not refuse its own caller.
_HELD: set[Path] = set()


@contextlib.contextmanager
def pretraining_run_lock(config: PretrainingConfig) -> Iterator[None]:
    """Hold ``config.output_dir``'s lock for a run, on all of the launcher's processes.

    A config without a dataset is refused first, before the output folder is created.
    Raises `ZooBusyError` (one line) when another run holds the folder.
    """
    if config.dataset is None:
        raise ValueError("no dataset: set `dataset` (--dataset PATH) to a zoo dataset folder")
    folder = Path(config.output_dir).resolve()
    if folder in _HELD:
        yield
        return
    state = PartialState()
    with contextlib.ExitStack() as stack:
        refusal = None
        if state.is_main_process:
            try:
                stack.enter_context(zoo_writer_lock(folder, PRETRAINING_LOCK_FILE))
            except ZooBusyError as error:
                refusal = str(error)
        if state.num_processes > 1:
            refusal = broadcast_object_list([refusal])[0]
        if refusal is not None:
            raise ZooBusyError(refusal)
        _HELD.add(folder)
        try:
            yield
            state.wait_for_everyone()  # the main process keeps the lock until all are done
        finally:
            _HELD.discard(folder)
