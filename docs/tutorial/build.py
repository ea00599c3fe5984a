"""Write docs/tutorial.ipynb (English) and docs/tutorial.zh.ipynb (Chinese) from the one source, tutorial.py.

    python docs/tutorial/build.py              # both notebooks, without outputs
    python docs/tutorial/build.py --execute    # both notebooks, run top to bottom (tiny backbones, a few minutes each)
    python docs/tutorial/build.py --check      # exit 1 if a committed notebook's cells differ from the source

tutorial.py is a notebook in jupytext's percent format. Each text cell comes twice, as `# %% [markdown] lang="en"`
and `# %% [markdown] lang="zh"`; code cells carry no language and go into both notebooks, so the two editions
cannot drift apart. Edit tutorial.py, never the .ipynb files: the tests compare them with what this script writes.
Executed notebooks are run with docs/ as the working directory, as Jupyter runs a notebook from its own folder.
"""

import argparse
import copy
import re
import sys
import time
from pathlib import Path

import jupytext
import nbformat

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "tutorial.py"
DOCS = HERE.parent
EDITIONS = {"en": DOCS / "tutorial.ipynb", "zh": DOCS / "tutorial.zh.ipynb"}
# A line break between two Chinese characters renders as a space in Markdown; the source wraps at 119 columns.
_CJK = "\u3000-\u303f\u4e00-\u9fff\uff00-\uffef"  # CJK punctuation, ideographs, full-width forms
_CJK_LINE_BREAK = re.compile(f"(?<=[{_CJK}])\n[ \t]*(?=[{_CJK}])")
METADATA = {
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


def edition(language: str, source: Path = SOURCE) -> nbformat.NotebookNode:
    """The notebook of one language: its text cells and every code cell, in source order, without outputs."""
    cells = jupytext.read(source, fmt="py:percent").cells
    unknown = {cell.metadata["lang"] for cell in cells if "lang" in cell.metadata} - EDITIONS.keys()
    if unknown:
        raise ValueError(f"{source}: text cells in unknown languages {sorted(unknown)}; known: {list(EDITIONS)}")
    notebook = nbformat.v4.new_notebook(metadata=copy.deepcopy(METADATA))
    code = text = 0
    for cell in cells:
        if cell.cell_type == "code":
            # Code cells get the same ids in both editions.
            notebook.cells.append(nbformat.v4.new_code_cell(cell.source, id=f"code-{code}"))
            code += 1
        elif cell.metadata.get("lang") in (None, language):
            source = _CJK_LINE_BREAK.sub("", cell.source) if language == "zh" else cell.source
            notebook.cells.append(nbformat.v4.new_markdown_cell(source, id=f"{language}-text-{text}"))
            text += 1
    return notebook


def execute(notebook: nbformat.NotebookNode, timeout: int = 900) -> nbformat.NotebookNode:
    """Run `notebook` top to bottom in a fresh kernel from docs/; its metadata stays the source's."""
    from nbclient import NotebookClient

    NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(DOCS)}},
    ).execute()
    notebook.metadata = copy.deepcopy(METADATA)  # not the kernel's version details: rebuilds stay comparable
    return notebook


def without_outputs(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy with no outputs or execution counts: what `edition` makes, if nobody edited the cells."""
    notebook = copy.deepcopy(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return notebook


def stale() -> list[Path]:
    """The committed notebooks whose cells or metadata differ from the source's (outputs aside)."""
    return [
        path
        for language, path in EDITIONS.items()
        if not path.exists() or without_outputs(nbformat.read(path, as_version=4)) != edition(language)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execute", action="store_true", help="Run each notebook and keep its outputs.")
    parser.add_argument("--check", action="store_true", help="Only check that the committed notebooks are current.")
    args = parser.parse_args(argv)
    if args.check:
        paths = stale()
        for path in paths:
            print(f"{path} differs from {SOURCE}: run python docs/tutorial/build.py", file=sys.stderr)
        return 1 if paths else 0
    for language, path in EDITIONS.items():
        notebook = edition(language)
        if args.execute:
            print(f"executing {path.name} ...", flush=True)
            start = time.perf_counter()
            notebook = execute(notebook)
            print(f"executed {path.name} in {time.perf_counter() - start:.0f} s")
        nbformat.write(notebook, path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
