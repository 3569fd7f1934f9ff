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


def test_the_cli_parses_and_prints_help_without_torch():
    # every command's parser (flags generated from the config dataclasses) and its help text,
    # with sys.modules checked after: help must not wait for torch and transformers
    code = (
        "import contextlib, io, sys\n"
        "from sane_hf import cli\n"
        "parser = cli.build_parser()\n"
        "texts = []\n"
        "for argv in [['--help'], *([name, '--help'] for name in cli.COMMAND_MODULES),\n"
        "             ['zoo', 'train', '--help'], ['predict', '--help']]:\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        "        parser.parse_args(argv)\n"
        "    texts.append(out.getvalue())\n"
        f"print(all(t.startswith('usage: sane-hf') for t in texts), "
        f"[m for m in {HEAVY!r} + ('numpy',) if m in sys.modules])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "True []"


def test_predicting_from_network_files_imports_no_dataset_or_fitting_library():
    # `sane-hf predict` on .safetensors files pays transformers' import and nothing heavier
    light = ("datasets", "sklearn", "pyarrow", "pandas", "matplotlib")
    code = (
        "import sys\n"
        "import sane_hf.downstream.pretrained, sane_hf.cli.embed\n"
        f"print([m for m in {light!r} if m in sys.modules])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
