"""The documentation's examples run, in order, and their assertions hold.

For every ``docs/*.md`` file with ```python blocks, the blocks are executed top to bottom in one
fresh namespace (blocks of a page build on each other), inside a temporary working directory and
with one torch thread.  A failure names the file, the block number and the block's first line
in the Markdown file.  Shell commands in the docs use ```bash fences and are not run.
"""
from __future__ import annotations

import pathlib
import re
import sys
import traceback

import pytest
import torch

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
ANY_FENCE = re.compile(r"^```([^\n`]*)$", re.MULTILINE)
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def python_blocks(path: pathlib.Path) -> list[tuple[int, str]]:
    """``(first line number, code)`` for each ```python block of ``path``, in order."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


DOC_EXTRAS = {"qipo.md": ("gymnasium", "minari"), "image.md": ("diffusers", "torchvision", "torchmetrics", "sklearn"),
              "molecules.md": ("rdkit", "torch_geometric"), "molecules_denovo.md": ("rdkit", "selfies")}
DOC_FILES = sorted(DOCS.glob("*.md")) + [DOCS.parent / "README.md"]
DOCS_WITH_CODE = [p for p in DOC_FILES if python_blocks(p)]


def test_docs_exist():
    names = {p.name for p in DOC_FILES}
    assert {"index.md", "concepts.md", "api.md", "tutorial_toy.md", "distributed.md"} <= names


@pytest.mark.parametrize("doc", DOCS_WITH_CODE, ids=lambda p: p.name)
def test_doc_examples_run(doc: pathlib.Path, tmp_path, monkeypatch):
    for module in DOC_EXTRAS.get(doc.name, ()):  # a domain page needs its extra: skip cleanly without it
        pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))      # examples may add the working directory
    modules_before = set(sys.modules)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace: dict = {"__name__": f"docs_{doc.stem}"}
    try:
        for number, (line, code) in enumerate(python_blocks(doc), start=1):
            failure = None
            try:
                # Pad with blank lines so that tracebacks show the line number in the Markdown file.
                exec(compile("\n" * (line - 1) + code, str(doc), "exec"), namespace)
            except Exception as err:  # noqa: BLE001 - report any failure with its location
                failure = (f"{doc.name}: python block {number} (line {line}) raised {type(err).__name__}: {err}\n\n"
                           + "".join(traceback.format_exception(err)))
            if failure is not None:
                pytest.fail(failure, pytrace=False)
    finally:
        torch.set_num_threads(threads)
        for name in set(sys.modules) - modules_before:  # modules the examples wrote into tmp_path
            if str(tmp_path) in str(getattr(sys.modules[name], "__file__", "") or ""):
                del sys.modules[name]


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: p.name)
def test_doc_fences_and_links(doc: pathlib.Path):
    text = doc.read_text(encoding="utf-8")
    fences = ANY_FENCE.findall(text)
    assert len(fences) % 2 == 0, f"{doc.name}: unbalanced code fences"
    languages = set(fences[0::2])
    assert languages <= {"python", "bash", "yaml", "text", "json", ""}, f"{doc.name}: unexpected fences {languages}"
    for target in LINK.findall(text):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"
