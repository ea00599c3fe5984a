"""Metric scripts for Hugging Face `evaluate`, shipped inside hf_vlm.

`evaluate` loads a metric from a folder that holds `<name>/<name>.py`, with no network::

    import evaluate
    import hf_vlm.metrics

    vqa = evaluate.load(hf_vlm.metrics.path("vqa_accuracy"))
    vqa.compute(predictions=["two"], references=[["2"]])  # {'vqa_accuracy': 1.0}

Metrics: `vqa_accuracy` (VQAv2 accuracy) and `caption_metrics` (BLEU-4, CIDEr-D, ROUGE-L as the
COCO caption evaluation computes them). This file imports only the standard library; the scripts
themselves are imported by `evaluate`, never by hf_vlm.
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def names() -> list[str]:
    """The metrics shipped here: folders that hold a script of the same name."""
    return sorted(folder.name for folder in _HERE.iterdir() if (folder / f"{folder.name}.py").is_file())


def path(name: str) -> str:
    """Folder of metric `name`, ready for `evaluate.load`; a `ValueError` lists the known names."""
    if name not in names():
        raise ValueError(f"Unknown metric {name!r}; hf_vlm ships: {', '.join(names())}.")
    return str(_HERE / name)
