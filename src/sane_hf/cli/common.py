"""Arguments shared by several `sane-hf` commands."""

from __future__ import annotations


def add_window_arguments(parser) -> None:
    """Halo-window and device flags shared by ``probe`` and ``sample``."""
    parser.add_argument(
        "--window", type=int, help="content tokens per window (default: half the training window)"
    )
    parser.add_argument("--halo", type=int, help="context tokens on each side (default: a quarter)")
    parser.add_argument("--batch-size", type=int, default=256, help="windows per forward pass")
    parser.add_argument("--device", help="where SANE runs (default: cuda when available, else cpu)")


def device_argument(args) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")
