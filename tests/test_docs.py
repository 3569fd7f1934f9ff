"""Docs that run: the ```python blocks of README.md and of the model card template execute.

Each document's blocks run in order in one namespace (a later block may use an earlier one's
names), in a temporary working directory that holds the released checkpoint at
``checkpoints/sane-cnn-mnist``, so snippets can load it by that relative path. Whatever blocks a
document has are run; a block that must not run (e.g. a sketch of a long training job) is
preceded by the line ``<!-- docs-test: skip -->``.
"""

import re
from pathlib import Path

import pytest
import torch

from sane_hf import ProbeHeads, SaneModel
from sane_hf.hub import build_model_card

ROOT = Path(__file__).parents[1]
RELEASED = ROOT / "checkpoints" / "sane-cnn-mnist"
SKIP_MARKER = "<!-- docs-test: skip -->"
BLOCK = re.compile(r"(?P<before>[^\n]*)\n```python[^\n]*\n(?P<code>.*?)```", re.DOTALL)
README_TEXT = (ROOT / "README.md").read_text(encoding="utf-8")


def python_blocks(markdown: str) -> list[str]:
    """The ```python blocks of ``markdown``, without those preceded by the skip marker."""
    blocks = []
    for match in BLOCK.finditer("\n" + markdown):
        if SKIP_MARKER not in match.group("before"):
            blocks.append(match.group("code"))
    return blocks


def run_blocks(blocks: list[str], name: str, workdir: Path, monkeypatch) -> dict:
    (workdir / "checkpoints").mkdir()
    for released in RELEASED.parent.iterdir():  # every shipped checkpoint, as in the repository
        (workdir / "checkpoints" / released.name).symlink_to(released, target_is_directory=True)
    monkeypatch.chdir(workdir)
    namespace: dict = {"__name__": "__docs__"}
    for index, code in enumerate(blocks):
        exec(compile(code, f"{name} python block {index + 1}", "exec"), namespace)
    return namespace


def test_block_extraction_honours_the_skip_marker():
    markdown = "text\n```python\na = 1\n```\n<!-- docs-test: skip -->\n```python\nb = 2\n```\n"
    markdown += "```bash\nls\n```\n```python title='x'\nc = 3\n```\n"
    assert python_blocks(markdown) == ["a = 1\n", "c = 3\n"]


def test_model_card_usage_runs_on_the_released_checkpoint(tmp_path, monkeypatch, capsys):
    model = SaneModel.from_pretrained(RELEASED)
    card = build_model_card(
        model.config,
        num_parameters=model.num_parameters(),
        model_id=f"checkpoints/{RELEASED.name}",
        probe_properties=ProbeHeads.from_pretrained(RELEASED).names,
    )
    blocks = python_blocks(str(card))
    assert len(blocks) == 2  # embed, then predict with the shipped probe heads
    namespace = run_blocks(blocks, "model card", tmp_path, monkeypatch)
    assert namespace["embeddings"].mean.shape == (3, model.config.latent_dim)
    assert "test_acc" in capsys.readouterr().out


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = python_blocks(README_TEXT)
    assert len(blocks) >= 2  # your own networks, the weights workflow
    torch.manual_seed(0)
    namespace = run_blocks(blocks, "README.md", tmp_path, monkeypatch)
    assert namespace["embeddings"].mean.shape == (3, 128)  # the five-line example ran
    assert namespace["mixed_embeddings"].mean.shape == (3, 64)  # three architectures, one space
