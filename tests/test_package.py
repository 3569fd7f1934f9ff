"""The package surface: a light `import sane_hf`, every public name importable, `python -m`."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

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


def _type_checking_imports() -> dict[str, list[str]]:
    """``{module: names}`` of the ``if TYPE_CHECKING:`` imports of ``sane_hf/__init__.py``."""
    tree = ast.parse(Path(sane_hf.__file__).read_text())
    block = next(
        node
        for node in tree.body
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
    )
    return {
        node.module.removeprefix("sane_hf."): sorted(alias.name for alias in node.names)
        for node in block.body
        if isinstance(node, ast.ImportFrom)
    }


def test_the_type_checking_mirror_lists_the_lazy_table():
    table = {module: sorted(names) for module, names in sane_hf._PUBLIC_API.items()}
    assert _type_checking_imports() == table


@pytest.mark.parametrize("module", sorted(sane_hf._PUBLIC_API))
def test_each_public_name_has_one_home_the_module_that_defines_it(module):
    """Every re-exported name is in its module's ``__all__`` and defined there (or, for a
    package such as ``weights.alignment``, in one of its modules), not imported from elsewhere."""
    imported = importlib.import_module(f"sane_hf.{module}")
    for name in sane_hf._PUBLIC_API[module]:
        assert name in imported.__all__, f"{name} is not in sane_hf.{module}.__all__"
        home = getattr(getattr(imported, name), "__module__", imported.__name__)
        inside = hasattr(imported, "__path__") and home.startswith(imported.__name__ + ".")
        assert home == imported.__name__ or inside, f"{name} is defined in {home}"


def test_the_top_level_is_what_a_user_needs():
    assert 30 <= len(sane_hf.__all__) <= 40
    for internal in ("condition_batchnorm", "draw_latents", "misclassified", "scratch_models"):
        assert internal not in sane_hf.__all__
    assert "push_folder" not in sane_hf.__all__
    # the internals stay importable from their modules
    from sane_hf.downstream.evaluation import scratch_models
    from sane_hf.downstream.novelty import misclassified
    from sane_hf.downstream.sampling import condition_batchnorm, draw_latents
    from sane_hf.hub import push_folder

    assert all((condition_batchnorm, draw_latents, misclassified, scratch_models, push_folder))


def test_dir_shows_the_public_names_and_no_helpers():
    names = dir(sane_hf)
    assert set(sane_hf.__all__) <= set(names) and "__version__" in names
    for helper in ("Any", "TYPE_CHECKING", "importlib", "annotations", "_PUBLIC_API"):
        assert helper not in names


def test_no_module_re_exports_a_name_defined_elsewhere():
    """``__all__`` of every module lists only what the module defines (no re-export shims of
    other sane_hf modules)."""
    package = Path(sane_hf.__file__).parent
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package.parent).with_suffix("")
        if path.name == "__init__.py" or "models/sane" in path.as_posix():
            continue  # packages gather names; the model files are checked above
        module = importlib.import_module(".".join(relative.parts))
        for name in getattr(module, "__all__", ()):
            value = getattr(module, name)
            home = getattr(value, "__module__", None)
            if home and home.startswith("sane_hf") and (isinstance(value, type) or callable(value)):
                assert home == module.__name__, f"{module.__name__}.{name} comes from {home}"


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
