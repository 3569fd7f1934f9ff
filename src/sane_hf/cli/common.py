"""Arguments and checks shared by several `sane-hf` commands."""

from __future__ import annotations

import re
from pathlib import Path

# A Hub repo id: ``name`` or ``namespace/name``.
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def add_window_arguments(parser) -> None:
    """Halo-window and device flags shared by ``probe`` and ``embed``."""
    parser.add_argument(
        "--window", type=int, help="content tokens per window (default: half the training window)"
    )
    parser.add_argument("--halo", type=int, help="context tokens on each side (default: a quarter)")
    parser.add_argument("--batch-size", type=int, default=256, help="windows per forward pass")
    add_device_argument(parser)


def add_device_argument(parser) -> None:
    parser.add_argument("--device", help="where SANE runs (default: cuda when available, else cpu)")


def device_argument(args) -> str:
    from sane_hf.zoo.distributed import default_device

    return args.device or default_device()


def check_sources(**sources: str | None) -> None:
    """Refuse a local path that does not exist before anything asks the Hub for it.

    ``check_sources(model=args.model)``: a value that is not a Hub repo id (``name`` or
    ``namespace/name``; e.g. ``/abs/path``, ``./x``, ``a/b/c``) must exist on disk, else one
    line names the argument and the path. A value that could be either is a Hub id when no such
    path exists.
    """
    for name, value in sources.items():
        if value is None or Path(value).expanduser().exists():
            continue
        if not _HUB_ID.match(value) or value.startswith("."):
            flag = "--" + name.replace("_", "-")
            raise FileNotFoundError(f"{flag} {value}: no such file or folder (and not a Hub id)")
