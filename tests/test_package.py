"""The package surface: a light `import sane_hf`, every public name importable, `python -m`."""

import subprocess
import sys

import pytest

import sane_hf

HEAVY = ("torch", "transformers", "datasets", "sklearn", "accelerate", "scipy", "matplotlib")


def test_import_sane_hf_loads_no_heavy_dependency():
    code = f"import sys, sane_hf; print([m for m in {HEAVY!r} if m in sys.modules])"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("name", sane_hf.__all__)
def test_every_public_name_resolves(name):
    assert getattr(sane_hf, name) is not None


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        sane_hf.no_such_name  # noqa: B018


def test_python_dash_m_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "sane_hf", "--help"], capture_output=True, text=True, check=True
    )
    assert "zoo" in result.stdout and "pretrain" in result.stdout
