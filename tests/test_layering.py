"""The layers stay apart: the model code needs neither TRL nor data nor the offline asset cache.

A checkpoint's code (hf_vlm.modeling, hf_vlm.processing) must load where only transformers is installed, and the
offline asset machinery (which shells out to pip and npm) serves the demo only.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "src" / "hf_vlm"


@pytest.mark.parametrize(
    "module, forbidden",
    [
        ("hf_vlm.modeling", ("trl", "peft", "datasets", "hf_vlm.offline", "hf_vlm.data", "hf_vlm.training")),
        ("hf_vlm.processing", ("trl", "peft", "datasets", "hf_vlm.offline", "hf_vlm.data", "hf_vlm.training")),
        ("hf_vlm.data", ("hf_vlm.offline",)),
        ("hf_vlm.training", ("hf_vlm.offline",)),
    ],
)
def test_importing_a_layer_does_not_import_what_it_must_not_need(module, forbidden):
    """In a fresh interpreter, importing `module` loads none of `forbidden`."""
    script = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert module in loaded  # the probe did import it
    offending = [name for name in loaded if any(name == f or name.startswith(f + ".") for f in forbidden)]
    assert not offending, offending


def top_level_imports(path: Path) -> set[str]:
    """Modules imported at a file's top level (not inside functions), relative imports resolved."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            names.add(".".join(part for part in (base, node.module) if part))
    return names


def test_no_module_outside_offline_imports_it_at_top_level():
    """Only hf_vlm.offline imports hf_vlm.offline at module level (data/sources imports it inside the `emoji`
    branch, when a user names that source)."""
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(
            name for name in top_level_imports(path) if name.startswith("hf_vlm.offline")
        )
        for path in PACKAGE.rglob("*.py")
        if "offline" not in path.parts
    }
    assert {path: names for path, names in offenders.items() if names} == {}
    assert "hf_vlm.paths" in top_level_imports(PACKAGE / "offline" / "assets.py")  # the walk resolves relative imports
