"""The dataset doctor names every planted problem by sample id, blocks on what would waste or break a run, and finds
nothing on clean data; the CLI's exit status and files; `--doctor true` stops a training script before training."""

import copy
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from datasets import Dataset
from PIL import Image
from transformers import TrainingArguments
from trl import SFTConfig

import hf_vlm.doctor as doctor
from hf_vlm.cli import DataArguments, ModelArguments
from hf_vlm.data import SkippedSamplesWarning, check_token_lengths, load_conversations
from hf_vlm.doctor import BlockingFindingsError, audit

LONG_TURN = "Tell me about this picture, please. " * 12  # ~370 tokens of the tiny tokenizer
MAX_LENGTH = 60  # the tiny SigLIP's 16 image tokens, a short question and answer fit; LONG_TURN does not


def row(sample_id, question="What is in the image?", answer="A red circle.", images=("red.png",)):
    return {
        "id": sample_id,
        "images": list(images),
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
    }


def clean_rows():
    return [row("red"), row("blue", "What colour is it?", "Blue.", ["blue.png"]), row("text-only", images=())]


def planted_rows():
    late_image = {
        "id": "late-image",
        "images": ["red.png"],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": LONG_TURN}, {"type": "image"}]},
            {"role": "assistant", "content": "red"},
        ],
    }
    two_placeholders = {
        "id": "two-placeholders",
        "images": ["red.png"],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which?"}]},
            {"role": "assistant", "content": "red"},
        ],
    }
    return clean_rows() + [
        row("answer-gone", question=LONG_TURN),  # the whole answer lies past max_length
        row("answer-cut", answer="A red circle. " * 12),  # the answer starts inside max_length and runs past it
        late_image,
        {"id": "no-assistant", "images": [], "messages": [{"role": "user", "content": "Hello?"}]},
        row("corrupt", images=["corrupt.png"]),
        row("missing", images=["gone.png"]),
        row("copy-of-red"),  # row("red") again under another id
        row("tiny", images=["tiny.png"]),
        row("wide", images=["wide.png"]),
        row("cmyk", images=["cmyk.jpg"]),
        two_placeholders,
    ]


PLANTED = {
    "missing_image": ["missing"],
    "corrupt_image": ["corrupt"],
    "image_count_mismatch": ["two-placeholders"],
    "bad_format": ["no-assistant"],
    "labels_all_masked": ["answer-gone"],
    "answer_truncated": ["answer-cut"],
    "image_truncated": ["late-image"],
    "tiny_image": ["tiny"],
    "extreme_aspect_ratio": ["wide"],
    "odd_image_mode": ["cmyk"],
    "duplicate": ["copy-of-red", "red"],
}
WARNINGS = {"odd_image_mode", "tiny_image", "extreme_aspect_ratio", "duplicate"}


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (40, 40), "red").save(tmp_path / "red.png")
    Image.new("RGB", (40, 40), "blue").save(tmp_path / "blue.png")
    Image.new("RGB", (8, 8), "green").save(tmp_path / "tiny.png")
    Image.new("RGB", (240, 40), "white").save(tmp_path / "wide.png")
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return tmp_path


def write(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


def by_kind(report) -> dict[str, list[str]]:
    return {finding.kind: sorted(finding.ids) for finding in report.findings}


def test_every_planted_problem_is_named_by_id_and_the_right_ones_block(built, folder):
    """Each planted problem is one finding naming exactly its sample; rejects and cuts block, the rest warn."""
    _, processor = built
    report = audit(write(folder / "d.json", planted_rows()), processor, stage=2, max_length=MAX_LENGTH)
    assert by_kind(report) == PLANTED
    assert {f.kind: f.blocking for f in report.findings} == {kind: kind not in WARNINGS for kind in PLANTED}
    assert report.blocking
    assert all(f.count == len(f.ids) for f in report.findings)
    # The loaders' rejects are not audited further; every other sample is.
    assert sorted(report.ids) == sorted(
        ["red", "blue", "text-only", "answer-gone", "answer-cut", "late-image", "copy-of-red", "tiny", "wide", "cmyk"]
    )


def test_under_on_error_skip_rejects_are_named_but_do_not_block(built, folder):
    """With --on_error skip the run drops rejected samples, so the doctor still names them but exits 0."""
    _, processor = built
    report = audit(write(folder / "d.json", planted_rows()), processor, 2, MAX_LENGTH, on_error="skip")
    assert by_kind(report) == PLANTED
    assert not report.blocking


def test_token_findings_are_those_check_token_lengths_drops(built, folder):
    """The doctor's cut and unlabelled samples are exactly the samples check_token_lengths rejects."""
    _, processor = built
    path = write(folder / "d.json", planted_rows())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_token_lengths(load_conversations(path, on_error="skip"), processor, MAX_LENGTH, on_error="skip")
    [report] = [w.message.report for w in caught if issubclass(w.category, SkippedSamplesWarning)][-1:]
    dropped = {sample_id for examples in report["examples"].values() for sample_id, _ in examples}
    found = by_kind(audit(path, processor, 2, MAX_LENGTH))
    cut = {"labels_all_masked", "answer_truncated", "image_truncated", "no_labels"}
    assert {sample_id for kind in cut for sample_id in found.get(kind, [])} == dropped
    assert dropped == {"answer-gone", "answer-cut", "late-image"}


def test_the_length_that_keeps_every_sample_is_the_smallest_such(built, folder):
    """At the reported max_length no sample is cut; one token less cuts a sample; 99% of 3 samples is all 3."""
    _, processor = built
    rows = [row("short"), row("long-question", question=LONG_TURN, images=["blue.png"]), row("text-only", images=())]
    path = write(folder / "d.json", rows)
    report = audit(path, processor, 2, max_length=None)
    keep_all = report.keeps(1.0)
    assert keep_all == max(report.needed) and report.keeps(0.99) == keep_all
    assert keep_all <= max(report.tokens)  # the end token's newline may go
    assert not audit(path, processor, 2, keep_all).findings
    assert by_kind(audit(path, processor, 2, keep_all - 1)) == {"answer_truncated": ["long-question"]}


def test_clean_data_has_no_findings(built, folder, tmp_path):
    """Distinct, readable, mid-sized images and short turns: no finding, nothing blocks (processor from a folder)."""
    _, processor = built
    processor.save_pretrained(tmp_path / "model")
    report = audit(write(folder / "d.json", clean_rows()), str(tmp_path / "model"), 2, MAX_LENGTH)
    assert report.findings == [] and not report.blocking
    assert sorted(report.ids) == ["blue", "red", "text-only"]
    assert "No findings." in report.to_markdown()


def test_an_end_token_outside_the_generation_span_blocks_even_under_skip(built, folder):
    """A template whose answers end outside {% generation %} never teaches the model to stop: every sample is named."""
    _, processor = built
    outside = copy.deepcopy(processor)
    outside.chat_template = processor.chat_template.replace(
        "{% generation %}{{- text + '<|im_end|>' -}}{% endgeneration %}",
        "{% generation %}{{- text -}}{% endgeneration %}{{- '<|im_end|>' -}}",
    )
    assert outside.chat_template != processor.chat_template
    report = audit(write(folder / "d.json", clean_rows()), outside, 2, MAX_LENGTH, on_error="skip")
    [finding] = report.findings
    assert finding.kind == "end_of_turn_outside_loss" and finding.blocking
    assert sorted(finding.ids) == ["blue", "red", "text-only"]
    assert "<|im_end|> is labelled in 0 of its 1 answer(s)" in finding.detail


def test_a_template_without_generation_markers_leaves_every_assistant_mask_empty(built, folder):
    """No {% generation %} span: every sample has an empty assistant mask, named as no_labels."""
    _, processor = built
    unmarked = copy.deepcopy(processor)
    unmarked.chat_template = processor.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    report = audit(write(folder / "d.json", clean_rows()), unmarked, 2, MAX_LENGTH)
    assert by_kind(report) == {"no_labels": sorted(report.ids)} and report.blocking


def test_cli_exits_1_on_a_blocking_finding_and_writes_markdown_json_and_histogram(backbones, folder):
    """`python -m hf_vlm.doctor` on the planted set: exit 1, each planted id in the Markdown, JSON and a PNG, written
    into a folder that did not exist (made before the audit, so a long audit is not lost to a missing folder)."""
    data = write(folder / "d.json", planted_rows())
    report = folder / "not" / "made" / "yet"
    command = [sys.executable, "-m", "hf_vlm.doctor", "--vision_model", backbones["siglip"]]
    command += ["--text_model", backbones["llama"], "--dataset", data, "--stage", "2", "--max_length", str(MAX_LENGTH)]
    command += [
        "--output",
        str(report / "r.md"),
        "--json",
        str(report / "r.json"),
        "--histogram",
        str(report / "h.png"),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env=os.environ | {"TQDM_DISABLE": "1"}
    )
    assert result.returncode == 1, result.stderr[-3000:]
    markdown = (report / "r.md").read_text()
    assert markdown in result.stdout
    for kind, sample_ids in PLANTED.items():
        line = next(line for line in markdown.splitlines() if f"`{kind}`" in line)
        assert all(f"`{i}`" in line for i in sample_ids)
        assert line.startswith("- warning" if kind in WARNINGS else "- **blocking**")
    assert "![Token lengths](h.png)" in markdown
    saved = json.loads((report / "r.json").read_text())
    assert saved["blocking"] and {f["kind"]: sorted(f["ids"]) for f in saved["findings"]} == PLANTED
    assert len(saved["samples"]["ids"]) == len(saved["samples"]["tokens"]) == 10
    assert Image.open(report / "h.png").size[0] > 100


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent.parent / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Reached(Exception):
    """Raised in place of the trainer: the script got past its data checks."""


def reached(*args, **kwargs):
    raise Reached


def test_doctor_true_stops_stage1_before_training_and_lets_clean_data_through(
    backbones, folder, tmp_path, monkeypatch
):
    """--doctor true: a caption too long for max_length stops the run with the report before the trainer exists;
    clean captions reach the trainer."""
    stage1 = load_script("train_stage1")
    monkeypatch.setattr(stage1, "VLMTrainer", reached)
    captions = [{"id": f"ok-{i}", "image": "red.png", "caption": "A red square."} for i in range(3)]
    model_args = ModelArguments(vision_model=backbones["siglip"], text_model=backbones["llama"])
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, disable_tqdm=True)

    def run(rows):
        data = stage1.DataArguments(dataset=write(folder / "c.json", rows), max_length=MAX_LENGTH, doctor=True)
        stage1.main(model_args, data, args)

    with pytest.raises(BlockingFindingsError, match=r"(?s)`answer_truncated`.*`too-long`"):
        run(captions + [{"id": "too-long", "image": "red.png", "caption": "A red square. " * 12}])
    with pytest.raises(Reached):
        run(captions)


def test_off_the_main_process_the_check_stops_the_same_and_prints_nothing(built, folder, capfd):
    """Another rank under torchrun raises the main process's error but shows neither the report nor a progress bar."""
    _, processor = built
    data = DataArguments(dataset=write(folder / "d.json", planted_rows()))
    errors = {}
    capfd.readouterr()  # the fixtures' own output
    for main_process in (True, False):
        with pytest.raises(BlockingFindingsError) as raised:
            doctor.check_before_training(
                data, processor, stage=2, max_length=MAX_LENGTH, seed=0, main_process=main_process
            )
        errors[main_process] = str(raised.value)
        printed = capfd.readouterr()
        shown = printed.out + printed.err
        if main_process:
            assert "# Dataset doctor" in shown and "auditing" in shown, shown[-500:]  # the report and progress bar
        else:
            assert shown == "", shown[-500:]
    assert errors[True] == errors[False]


def test_doctor_true_stops_stage2_on_cut_image_tokens(backbones, folder, tmp_path, monkeypatch):
    """--doctor true in stage 2 audits at SFTConfig's max_length and stops before the trainer on cut image tokens."""
    stage2 = load_script("train_stage2")
    monkeypatch.setattr(stage2, "VLMSFTTrainer", reached)
    late = next(r for r in planted_rows() if r["id"] == "late-image")
    data = stage2.DataArguments(dataset=write(folder / "d.json", clean_rows() + [late]), doctor=True)
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_length=MAX_LENGTH,
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
    )
    model_args = ModelArguments(vision_model=backbones["siglip"], text_model=backbones["llama"])
    with pytest.raises(BlockingFindingsError, match=r"(?s)`image_truncated`.*`late-image`"):
        stage2.main(model_args, data, stage2.TuningArguments(), args)


def test_a_collator_failure_is_traced_to_its_sample(built, folder, monkeypatch):
    """When the collator raises on a batch, each row is collated alone, and the failing one is named (blocking)."""

    class Failing(doctor.ConversationCollator):
        def __call__(self, rows):
            if any(row["id"] == "blue" for row in rows):
                raise RuntimeError("encode_conversation disagrees with the processor's encoding")
            return super().__call__(rows)

    monkeypatch.setattr(doctor, "ConversationCollator", Failing)
    _, processor = built
    report = audit(write(folder / "d.json", clean_rows()), processor, 2, MAX_LENGTH, on_error="skip")
    [finding] = report.findings
    assert (finding.kind, finding.ids, finding.blocking) == ("collator_error", ["blue"], True)
    assert finding.detail == "RuntimeError: encode_conversation disagrees with the processor's encoding"


def test_stage1_captions_as_a_dataset_are_audited_with_the_caption_prompt(built, folder):
    """A `Dataset` of caption rows: the caption collator's prompt counts toward the length, a tiny image warns."""
    _, processor = built
    rows = Dataset.from_list(
        [
            {"id": "red", "image": str(folder / "red.png"), "caption": "A red square."},
            {"id": "tiny", "image": str(folder / "tiny.png"), "caption": "A green square."},
        ]
    )
    report = audit(rows, processor, stage=1, max_length=MAX_LENGTH)
    assert by_kind(report) == {"tiny_image": ["tiny"]} and not report.blocking
    longer = audit(rows, processor, stage=1, prompt="Describe the image in full detail, please.")
    assert [b - a for a, b in zip(report.tokens, longer.tokens)] == [longer.tokens[0] - report.tokens[0]] * 2
    assert longer.tokens[0] > report.tokens[0]
