"""Local path or Hub repo id? Decided before anything asks the Hub, so that a mistyped path is
"no such file or folder" at once instead of half a minute of Hub retries."""

from __future__ import annotations

import re
from pathlib import Path

# A Hub repo id: ``name`` or ``namespace/name``.
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
# Suffixes of files, never of Hub repo names a user would type.
FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".json", ".yaml", ".yml", ".parquet")


def missing_local_path(value: str) -> str | None:
    """Why ``value`` is a local path that does not exist, or None when it exists or may be a
    Hub id.

    A value that cannot be a Hub id (``/abs/path``, ``./x``, ``a/b/c``, ``~/x``) is a path; so
    is ``a/b`` when ``a`` is a folder here (``checkpoints/sane-cnn-mnsit`` next to
    ``checkpoints/``) and a name with a file suffix (``model.pt``).
    """
    if Path(value).expanduser().exists():
        return None
    if not HUB_ID.match(value) or value.startswith((".", "~")):
        return "no such file or folder (and not a Hub id)"
    head = value.split("/")[0]
    if "/" in value and Path(head).is_dir():
        return f"no such file or folder (and not a Hub id: {head}/ is a local folder)"
    if value.lower().endswith(FILE_SUFFIXES):
        return "no such file"
    return None
