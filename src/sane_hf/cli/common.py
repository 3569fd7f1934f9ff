"""Arguments and checks shared by several `sane-hf` commands."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


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


def check_sources(sources: Mapping[str, str | list[str] | None], local: bool = False) -> None:
    """Refuse a local path that does not exist before anything asks the Hub for it.

    ``check_sources({"--model": args.model, "networks": args.networks})``: a value that is no
    Hub id (`sane_hf.utils.sources.missing_local_path`) must exist, else one line names the
    argument and the path. With ``local``, every value must exist (folders never read from the
    Hub, such as the one ``zoo info`` describes).
    """
    from sane_hf.utils.sources import missing_local_path

    for argument, values in sources.items():
        for value in [values] if isinstance(values, str) else values or []:
            if local:
                problem = None if Path(value).expanduser().exists() else "no such file or folder"
            else:
                problem = missing_local_path(value)
            if problem:
                raise FileNotFoundError(f"{argument} {value}: {problem}")
