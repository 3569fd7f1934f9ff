"""The `sane-hf` command line (also `python -m sane_hf`).

One module per command group; each exposes `register(subparsers)`, which adds its argparse
sub-commands with `set_defaults(func=handler)`. A handler calls one public API function and
prints its result.

Errors, for every command alike (`main`): a user error (bad value, missing file, Hub refusal)
is one line on stderr and exit status 1; a usage error is argparse's message and exit status 2;
the traceback only with ``--debug`` or ``SANE_HF_DEBUG=1``.

Threads: parsing imports no torch, so `main` sets ``OMP_NUM_THREADS`` and, while other
processes keep CPUs busy, ``OMP_WAIT_POLICY=PASSIVE`` before the command imports it, each
unless the user set it: ``--threads N``, else the CPUs this process may use minus those other
processes keep busy (`free_cpus`). OpenMP's default lets idle threads spin for their next task,
one per core; next to other busy processes the spinning threads took the CPU from the working
ones and a one-minute demo took 6-8 minutes on a shared 2-core machine (1:05 with
``OMP_NUM_THREADS=1``); on a machine of its own, spinning is what makes two threads pay.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from pathlib import Path

# The command groups, in the order they appear in --help.
COMMAND_MODULES = ["zoo", "pretrain", "probe", "embed", "sample", "demo", "push"]

# Errors a user can fix from the message alone (bad values, files, the Hub); any other error is
# also one line, with a pointer to --debug, since it is more likely a bug of sane-hf.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RuntimeError, ImportError)


def configure_threads(threads: int | None = None) -> None:
    """Thread settings (before torch is imported): ``threads`` threads, else ``OMP_NUM_THREADS``
    as the user set it, else `free_cpus`; and, unless the user chose a policy, passive OpenMP
    waiting while other processes keep CPUs busy. Measured on a 2-core CPU (BENCHMARKS.md):
    with the machine to itself, OpenMP's default (idle threads spin a while) made 2 threads
    1.5x faster than one and passive waiting 0.9-1.0x; next to other jobs, spinning made them
    5-20x slower than one thread and passive waiting 1.2-1.9x faster."""
    cpus = _affinity_cpus()
    if "OMP_WAIT_POLICY" not in os.environ and free_cpus() < cpus:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(free_cpus())
    if "torch" in sys.modules:  # imported before main (an embedding script): too late for OMP_*
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def free_cpus() -> int:
    """The CPUs this process may use (its affinity mask) minus those other processes keep busy,
    at least one. Busy: the fewer of the one-minute load average and the tasks running right
    now besides this one (``/proc/loadavg``); the average alone still counts a job that ended
    a minute ago, which kept a run that started after it on one core of two."""
    cpus = _affinity_cpus()
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        busy = min(busy, running - 1)
    return max(1, min(cpus, round(cpus - busy)))


def _affinity_cpus() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cpus or 1


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sane-hf", description="SANE weight-space learning")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of an error (also SANE_HF_DEBUG=1)",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        help="CPU threads for torch (default: OMP_NUM_THREADS, else the CPUs this process may "
        "use minus those other processes keep busy)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"sane_hf.cli.{name}").register(subparsers)
    return parser


def error_line(error: BaseException) -> str:
    """One line saying what went wrong: the Hub's HTTP errors as ``repo X: HTTP 401 ...``,
    others as their message (KeyError's quotes removed)."""
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    if status is not None:
        try:
            url = str(response.url or "")
        except Exception:  # httpx raises when the response has no request
            url = ""
        repo = _repo_of_url(url)
        reason = getattr(response, "reason", "") or ""
        where = f"repo {repo}: " if repo else (f"{url}: " if url else "")
        detail = str(error).splitlines()[0] if str(error) else ""
        return f"{where}HTTP {status} {reason}".rstrip() + (f" ({detail})" if detail else "")
    if isinstance(error, KeyError) and error.args:
        message = str(error.args[0])
    else:
        message = str(error) or type(error).__name__
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _repo_of_url(url: str) -> str | None:
    """``user/name`` of a Hub API or file URL (``/api/models/user/name/...``,
    ``/user/name/resolve/...``), else None."""
    from urllib.parse import urlparse

    parts = [part for part in urlparse(url).path.split("/") if part]
    if len(parts) >= 4 and parts[0] == "api" and parts[1] in ("models", "datasets", "spaces"):
        return "/".join(parts[2:4])
    if "resolve" in parts and parts.index("resolve") >= 2:
        index = parts.index("resolve")
        return "/".join(parts[index - 2 : index])
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # usage errors: argparse prints them, exit 2
    configure_threads(args.threads)  # parsing imported no torch: the thread settings still apply
    debug = args.debug or os.environ.get("SANE_HF_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("sane-hf: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            raise
        line = f"sane-hf {args.command}: error: {error_line(error)}"
        if not _is_user_error(error):
            line += f" ({type(error).__name__}; rerun with --debug for the traceback)"
        print(line, file=sys.stderr)
        return 1


def _is_user_error(error: BaseException) -> bool:
    if isinstance(error, USER_ERRORS):
        return True
    # huggingface_hub's errors (HTTP, repository not found, offline) without importing it here
    return type(error).__module__.startswith(("huggingface_hub", "requests", "httpx"))
