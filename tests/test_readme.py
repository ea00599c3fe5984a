"""Every ```python block of README.md runs as written, each in a fresh Python process, offline; VLMConfig's
docstring example passes as a doctest.

A few things the README names exist only on a user's machine or on the Hub. The tests put tiny local stand-ins
in their place, and only these:
- the Hub ids given to `build_vlm` (`HUB_IDS`) are replaced, in the block's text, by the `backbones` fixture's
  tiny SigLIP and Llama folders; `HF_HUB_OFFLINE=1` stays set, so any other Hub id fails its block;
- the files a block opens relative to where the user works, `photo.jpg` and the demo's `runs/demo/model`, are
  made in the block's working directory: a generated picture, and the `built` tiny model saved with its processor;
- a block that calls `push(` talks to the `hub` fixture's loopback Hub server instead of huggingface.co, and the
  test checks that a commit arrived there.
Anything else a block needs and does not define (a name, a file, a Hub id) makes it fail: no block is skipped.
"""

import doctest
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from transformers.testing_utils import HfDocTestParser

import hf_vlm

README = (Path(__file__).parents[1] / "README.md").read_text()
HUB_IDS = {"google/siglip-base-patch16-224": "siglip", "HuggingFaceTB/SmolLM2-135M-Instruct": "llama"}


def python_blocks() -> list[tuple[str, str]]:
    """(name, source) of each ```python block, named by its place and the section it is in."""
    blocks = []
    for index, match in enumerate(re.finditer(r"^```python\n(.*?)^```", README, re.S | re.M)):
        sections = re.findall(r"^#+ (.+)$", README[: match.start()], re.M)
        blocks.append((f"{index}-{sections[-1] if sections else 'top'}", match.group(1)))
    return blocks


BLOCKS = python_blocks()


def test_readme_has_python_blocks_and_every_stand_in_is_used():
    """The README has python blocks (an empty parametrization would run nothing) and names every mapped Hub id."""
    assert len(BLOCKS) >= 3
    assert all(f'"{hub_id}"' in README for hub_id in HUB_IDS)


@pytest.mark.parametrize("source", [source for _, source in BLOCKS], ids=[name for name, _ in BLOCKS])
def test_readme_python_block_runs(source, backbones, built, tmp_path, request):
    """The block runs to the end in a fresh process, with only the stand-ins of the module docstring."""
    for hub_id, name in HUB_IDS.items():
        source = source.replace(f'"{hub_id}"', repr(backbones[name]))
    Image.new("RGB", (40, 30), "red").save(tmp_path / "photo.jpg")
    model, processor = built
    model.save_pretrained(tmp_path / "runs/demo/model")
    processor.save_pretrained(tmp_path / "runs/demo/model")
    hub = request.getfixturevalue("hub") if "push(" in source else None  # sets the environment for the process
    env = os.environ | ({} if hub else {"HF_HUB_OFFLINE": "1"})
    (tmp_path / "block.py").write_text(source)

    result = subprocess.run(
        [sys.executable, "block.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"{source}\n{result.stderr[-3000:]}"
    if hub:
        assert [m for m, path, _ in hub.server.log if m == "POST" and "/commit/" in path], (
            "nothing reached the loopback Hub"
        )


def test_vlm_config_docstring_example_passes():
    """VLMConfig's docstring example gives the output it shows (transformers' doctest parser reads its ``` fences)."""
    test = HfDocTestParser().get_doctest(hf_vlm.VLMConfig.__doc__, {}, "VLMConfig", None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.summarize(verbose=False) == doctest.TestResults(failed=0, attempted=4)
