"""docs/tutorial: both editions come from one source with shared code, the committed notebooks are current, the
checklist's links lead somewhere, and (slow) both notebooks run top to bottom on tiny backbones."""

import importlib.util
import json
import re
import time
from pathlib import Path

import nbformat
import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
_spec = importlib.util.spec_from_file_location("tutorial_build", DOCS / "tutorial" / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

CJK = re.compile(r"[\u4e00-\u9fff]")
ANCHOR = re.compile(r'<a id="([^"]+)"></a>')


def committed(language: str) -> nbformat.NotebookNode:
    return nbformat.read(build.EDITIONS[language], as_version=4)


def cells(notebook, kind: str) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == kind]


def test_editions_have_identical_code_cells_and_one_text_cell_for_each_other():
    """English and Chinese editions, built and committed, share every code cell; their text cells pair up."""
    for make in (build.edition, committed):
        english, chinese = make("en"), make("zh")
        assert [(c.id, c.source) for c in cells(english, "code")] == [(c.id, c.source) for c in cells(chinese, "code")]
        assert len(cells(english, "code")) >= 10
        # The same sequence of cell kinds: each English text cell has its translation in the same place.
        assert [c.cell_type for c in english.cells] == [c.cell_type for c in chinese.cells]
        for en, zh in zip(cells(english, "markdown"), cells(chinese, "markdown")):
            assert not CJK.search(en.source), en.source[:80]
            assert CJK.search(zh.source), zh.source[:80]
            assert ANCHOR.findall(en.source) == ANCHOR.findall(zh.source)


def test_every_text_cell_of_the_source_has_a_known_language():
    """A text cell without a language marker would appear in both editions: the source has none."""
    source = build.jupytext.read(build.SOURCE, fmt="py:percent")
    languages = [cell.metadata.get("lang") for cell in source.cells if cell.cell_type == "markdown"]
    assert languages == ["en", "zh"] * (len(languages) // 2)


def test_committed_notebooks_are_what_build_py_writes_from_the_source():
    """Nobody edited an .ipynb by hand: outputs aside, each committed notebook equals build.py's output."""
    for language, path in build.EDITIONS.items():
        assert build.without_outputs(committed(language)) == build.edition(language), (
            f"{path.name} differs from docs/tutorial/tutorial.py; run python docs/tutorial/build.py"
        )
    assert build.stale() == []


def test_stale_notices_a_hand_edit(tmp_path, monkeypatch):
    """The check above can fail: a notebook with one changed code cell is reported."""
    edited = build.edition("en")
    cells(edited, "code")[-1].source += "\nprint('edited by hand')"
    nbformat.write(edited, tmp_path / "tutorial.ipynb")
    monkeypatch.setitem(build.EDITIONS, "en", tmp_path / "tutorial.ipynb")
    assert build.stale() == [tmp_path / "tutorial.ipynb"]


def test_checklist_links_lead_to_existing_files_and_notebook_sections():
    """Every relative link of docs/checklist.md names a file that exists, and each #anchor is in both notebooks."""
    links = re.findall(r"\]\(([^)#\s]+)(?:#([^)\s]+))?\)", (DOCS / "checklist.md").read_text())
    assert len(links) >= 8
    anchors = {
        language: {anchor for cell in build.edition(language).cells for anchor in ANCHOR.findall(cell.source)}
        for language in build.EDITIONS
    }
    for target, anchor in links:
        if target.startswith("http"):
            continue
        assert (DOCS / target).exists(), target
        if anchor:
            assert target in ("tutorial.ipynb", "tutorial.zh.ipynb"), (target, anchor)
            assert all(anchor in found for found in anchors.values()), anchor


# Each notebook should take 2-3 minutes on 2 free CPU cores; the limit leaves room for a slower machine.
EXECUTION_LIMIT_S = 360


@pytest.mark.slow
@pytest.mark.parametrize("language", ["en", "zh"])
def test_notebook_runs_top_to_bottom_offline_on_tiny_backbones(language, tmp_path, monkeypatch):
    """The notebook executes without an error from docs/, within the time limit, and shows its checks and figures."""
    monkeypatch.setenv("HF_VLM_TUTORIAL_BACKBONES", "tiny")
    monkeypatch.setenv("HF_VLM_TUTORIAL_OUTPUT", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    notebook = build.execute(build.edition(language), timeout=EXECUTION_LIMIT_S)
    seconds = time.perf_counter() - start
    assert seconds < EXECUTION_LIMIT_S, f"{language}: {seconds:.0f} s"

    outputs = [output for cell in cells(notebook, "code") for output in cell.outputs]
    text = "".join(output.get("text", "") for output in outputs)
    assert "logits from our merge equal the model's (ids + pixels): True" in text
    assert "ValueError: Image features and image tokens do not match" in text
    assert re.search(r"stage 1: tower frozen \d+ ms/step, trainable \d+ ms/step", text)
    figures = [output for output in outputs if "image/png" in output.get("data", {})]
    # architecture, feature map, the study's three figures, live token maps, loss curves, answers
    assert len(figures) >= 8, len(figures)
    html = "".join(output.get("data", {}).get("text/html", "") for output in outputs)
    study = json.loads((DOCS / "projectors" / "projectors.json").read_text())
    assert all(design in html for design in study["summary"])  # the study's table, read from its JSON
    assert (tmp_path / "stage2" / "model.safetensors").exists()
