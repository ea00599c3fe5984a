"""The dataset doctor: what in a training set would waste or break a run, found before step 1, by sample id.

    python -m hf_vlm.doctor --model_name_or_path runs/stage1 --dataset data/train.json --stage 2 --max_length 1024 \\
        --output doctor.md --json doctor.json --histogram lengths.png
    python -m hf_vlm.doctor --config scripts/configs/stage2_offline.yaml --stage 2  # a recipe's model, data, length

`audit` loads the data as the training scripts do (`hf_vlm.data.sources`, with every sample the loaders reject kept
for the report instead of raised), encodes each sample with the processor's chat template (`encode_conversation`,
judged by `token_problem`, the rule of `check_token_lengths` and of the collators), runs the stage's collator on the
samples that pass and reads every image. The `Report` gives token-length statistics, the smallest `max_length` that
keeps every sample (and 99% of them), and findings that each name their samples (the first few, and the count).

Blocking findings make the command exit 1 and stop a training script run with `--doctor true`: samples the run
would stop at under `--on_error raise` (a missing or corrupt image, a bad record, labels that would be all -100, an
answer or image cut by `max_length`; under `--on_error skip` the run drops them and they are warnings), a collator
that fails, and an end-of-turn token outside the loss (the model would not learn to stop). Warnings (images in an odd
mode, tiny, huge or very elongated ones, exact duplicates) exit 0.
"""

import hashlib
import json
import os
import sys
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset
from tqdm.auto import tqdm
from trl import SFTConfig, TrlParser

from .cli import DataArguments, ModelArguments, load_vlm
from .data.collators import DEFAULT_CAPTION_PROMPT, CaptionCollator, ConversationCollator, caption_to_conversation
from .data.images import load_image, source_mode
from .data.llava import load_captions, load_conversations
from .data.schema import BadSampleError, SkippedSamplesWarning
from .data.sources import caption_dataset, conversation_dataset
from .processing import CHAT_TEMPLATES, END_OF_TURN, VLMProcessor, encode_conversation, token_problem

# What each finding means, in the order the report lists them.
KINDS = {
    # Rejected by the loaders (`hf_vlm.data.schema.REASONS`).
    "missing_image": "the image file does not exist",
    "corrupt_image": "Pillow cannot read the image",
    "image_too_large": "more pixels than PIL.Image.MAX_IMAGE_PIXELS",
    "unsupported_image": "an image mode that cannot become RGB",
    "image_count_mismatch": "image placeholders and images differ in number",
    "empty_text": "an empty caption or answer, or a user turn with neither text nor image",
    "bad_format": "the record's structure: keys, roles, turn order (e.g. no assistant turn)",
    # Rejected by `token_problem` (check_token_lengths, the collators).
    "no_labels": "empty assistant mask: no token carries a label, so the sample trains on nothing",
    "labels_all_masked": "max_length cuts every answer token: the labels would be all -100",
    "answer_truncated": "max_length would cut part of an answer, which teaches answers that stop early",
    "image_truncated": "max_length would cut image tokens, which the model cannot take",
    # Found in the collator's batches.
    "collator_error": "the stage's collator fails on the sample",
    "end_of_turn_outside_loss": "the end-of-turn token is not labelled, so the model will not learn to stop",
    # Warnings.
    "end_of_turn_unknown": "no end-of-turn token known for this chat template, so whether it is learned is unchecked",
    "odd_image_mode": "an image mode the loaders convert to RGB (hf_vlm.data.images): check that it looks right",
    "tiny_image": "an image this small carries little for the vision tower to see",
    "huge_image": "an image this large is decoded at full size before it is resized (slow, memory)",
    "extreme_aspect_ratio": "resizing to the square input squashes (or a crop drops) most of such an image",
    "duplicate": "samples with the same images and the same text (every copy is named)",
}
# What the training scripts raise on under --on_error raise, and drop under skip.
REJECTED = (
    "missing_image",
    "corrupt_image",
    "image_too_large",
    "unsupported_image",
    "image_count_mismatch",
    "empty_text",
    "bad_format",
    "no_labels",
    "labels_all_masked",
    "answer_truncated",
    "image_truncated",
)
ALWAYS_BLOCKING = ("collator_error", "end_of_turn_outside_loss")
USUAL_MODES = ("RGB", "RGBA", "L", "LA", "P")
TINY_SIDE = 32  # px, shortest side
HUGE_PIXELS = 4096 * 4096
MAX_ASPECT_RATIO = 4.0  # longest side / shortest side
SHOWN_IDS = 5  # ids a finding names in the Markdown report; the JSON keeps up to 100


@dataclass
class Finding:
    """One kind of problem: how many samples have it, the first ids (up to 100; of the loaders' rejects, the first 5
    of each load), and the first sample's detail."""

    kind: str
    blocking: bool
    count: int
    ids: list[str]
    detail: str

    @property
    def meaning(self) -> str:
        return KINDS[self.kind]


@dataclass
class Report:
    """What `audit` found. `tokens[i]` and `needed[i]` belong to the audited sample `ids[i]`."""

    dataset: str
    stage: int
    max_length: int | None
    ids: list[str]
    tokens: list[int]  # tokens of each sample, image tokens included, before truncation
    needed: list[int]  # the smallest max_length that keeps each sample's image and answer tokens
    findings: list[Finding]
    on_error: str = "raise"  # the run's setting, which decided whether rejected samples block

    @property
    def blocking(self) -> bool:
        return any(finding.blocking for finding in self.findings)

    def keeps(self, fraction: float) -> int:
        """The smallest max_length that keeps at least `fraction` of the audited samples whole."""
        ordered = sorted(self.needed)
        return ordered[max(0, int(np.ceil(fraction * len(ordered))) - 1)] if ordered else 0

    def to_dict(self) -> dict:
        summary = {
            "dataset": self.dataset,
            "stage": self.stage,
            "max_length": self.max_length,
            "on_error": self.on_error,
            "audited": len(self.ids),
            "blocking": self.blocking,
            "max_length_keeping_all": self.keeps(1.0),
            "max_length_keeping_99_percent": self.keeps(0.99),
            "token_percentiles": self.percentiles(),
            "findings": [asdict(finding) | {"meaning": finding.meaning} for finding in self.findings],
        }
        return summary | {"samples": {"ids": self.ids, "tokens": self.tokens, "needed": self.needed}}

    def percentiles(self) -> dict[str, int]:
        if not self.tokens:
            return {}
        points = {"min": 0, "p50": 50, "p90": 90, "p95": 95, "p99": 99, "max": 100}
        return {name: int(np.percentile(self.tokens, q, method="higher")) for name, q in points.items()}

    def to_markdown(self, histogram: str | None = None) -> str:
        blocking = [f for f in self.findings if f.blocking]
        lines = [
            "# Dataset doctor",
            "",
            f"`{self.dataset}`, stage {self.stage}, max_length {self.max_length}, on_error {self.on_error}: "
            f"{len(self.ids)} samples audited, after the loaders' rejects (those are counted over every record).",
            "",
            f"**{len(blocking)} blocking finding(s)**: the run would stop, or train on nothing or never learn to stop."
            if blocking
            else "**No blocking finding.**",
            "",
            "## Token lengths",
            "",
        ]
        if self.tokens:
            table = self.percentiles()
            lines += [
                "Tokens per sample, image tokens included, before truncation:",
                "",
                "| " + " | ".join(table) + " |",
                "|" + "---:|" * len(table),
                "| " + " | ".join(str(value) for value in table.values()) + " |",
                "",
                f"The smallest max_length that keeps every sample's image and answer tokens is **{self.keeps(1.0)}**; "
                f"**{self.keeps(0.99)}** keeps 99% of the samples.",
            ]
            if self.max_length is not None:
                cut = sum(tokens > self.max_length for tokens in self.tokens)
                lines.append(f"max_length {self.max_length} truncates {cut} of {len(self.tokens)} samples.")
            if histogram:
                lines += ["", f"![Token lengths]({histogram})"]
        else:
            lines.append("No sample to measure.")
        lines += ["", "## Findings", ""]
        for finding in self.findings:
            shown = ", ".join(f"`{sample_id}`" for sample_id in finding.ids[:SHOWN_IDS])
            more = f" and {finding.count - SHOWN_IDS} more" if finding.count > SHOWN_IDS else ""
            lines.append(
                f"- {'**blocking**' if finding.blocking else 'warning'} `{finding.kind}`: {finding.meaning}. "
                f"{finding.count} sample(s): {shown}{more}. First: {finding.detail}"
            )
        if not self.findings:
            lines.append("No findings.")
        return "\n".join(lines) + "\n"

    def save_histogram(self, path) -> None:
        """A histogram of `tokens`, with the planned max_length and the lengths that keep all and 99% of samples."""
        from matplotlib.figure import Figure  # a bare Figure renders with Agg, no pyplot state

        figure = Figure(figsize=(6.4, 3.6), layout="constrained")
        axes = figure.subplots()
        axes.hist(self.tokens, bins=min(50, max(1, len(set(self.tokens)))), color="C0")
        marks = [(self.keeps(1.0), "keeps all", "k", "-"), (self.keeps(0.99), "keeps 99%", "0.4", ":")]
        if self.max_length is not None:
            marks.append((self.max_length, "max_length", "C3", "--"))
        for value, label, color, style in marks:
            axes.axvline(value, color=color, ls=style, label=f"{label}: {value}")
        axes.set(xlabel="tokens per sample (image tokens included)", ylabel="samples", title=Path(self.dataset).name)
        axes.legend(fontsize=8)
        figure.savefig(path, dpi=110)


class BlockingFindingsError(RuntimeError):
    """Raised by `check_before_training`; the message lists the blocking findings as the Markdown report does."""


def check_before_training(
    data_args: DataArguments,
    processor: VLMProcessor,
    *,
    stage: int,
    max_length: int | None,
    seed: int,
    main_process: bool = True,
    prompt: str = DEFAULT_CAPTION_PROMPT,
) -> Report:
    """The training scripts' `--doctor true`: audit what the run would train on, print the report on the main process,
    and raise `BlockingFindingsError` (listing the blocking findings) before any trainer exists.

    Under torchrun every rank audits the same data, so every rank stops on the same findings without a collective;
    only the main process shows the progress bar and the report."""
    report = audit(
        data_args.dataset,
        processor,
        stage=stage,
        max_length=max_length,
        image_folder=data_args.image_folder,
        on_error=data_args.on_error,
        limit=data_args.max_samples,
        prompt=prompt,
        seed=seed,
        progress=main_process,
    )
    markdown = report.to_markdown()
    if main_process:
        print(markdown)
    lines = [line for line in markdown.splitlines() if line.startswith("- **blocking**")]
    if lines:
        raise BlockingFindingsError("the dataset doctor found what would waste or break the run:\n" + "\n".join(lines))
    return report


def audit(
    dataset: str | Dataset,
    processor: VLMProcessor | str,
    stage: int,
    max_length: int | None = None,
    *,
    image_folder: str | None = None,
    on_error: str = "raise",
    limit: int | None = None,
    prompt: str = DEFAULT_CAPTION_PROMPT,
    seed: int = 42,
    batch_size: int = 16,
    progress: bool = True,
) -> Report:
    """Audit `dataset` for training stage `stage` (1: captions, 2: conversations) at `max_length`.

    Args:
        dataset: a source as the training scripts' `--dataset` takes it (`hf_vlm.data.sources`), or a `Dataset` of
            rows in the stage's shape (validated by `load_captions` / `load_conversations`).
        processor: a `VLMProcessor`, or the folder or Hub id of a saved hf_vlm model whose processor to load.
        max_length: the truncation length training will use (None: none).
        image_folder, seed: as the scripts take them; `seed` decides which rows `limit` keeps, as `max_samples`.
        on_error: the run's setting; it decides whether the loaders' and the token check's rejects block.
        limit: audit this many samples (the loaders still validate every record, once, cached).
        prompt: stage 1's user turn before each caption (`CaptionCollator`'s).
        batch_size: rows per collator call.
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    if isinstance(processor, (str, os.PathLike)):
        processor = VLMProcessor.from_pretrained(processor)
    findings = _Findings()
    rows = _load(dataset, stage, image_folder, limit, seed, findings)
    captions = stage == 1
    collate = (
        CaptionCollator(processor, prompt=prompt, max_length=max_length)
        if captions
        else ConversationCollator(processor, max_length=max_length)
    )
    end_token = _end_of_turn(processor)
    end_id = processor.tokenizer.convert_tokens_to_ids(end_token) if end_token else None
    if end_id is None:
        findings.add(
            "end_of_turn_unknown", "(every sample)", "the tokenizer has no eos_token and the template is custom"
        )

    ids, tokens, needed, batch, seen = [], [], [], [], {}

    def run_collator(batch: list[dict]) -> None:
        try:
            labels = collate(batch)["labels"]
        except Exception as error:  # any failure stops training at this batch: find its sample
            if len(batch) > 1:
                for row in batch:
                    run_collator([row])
            else:
                findings.add("collator_error", batch[0]["id"], f"{type(error).__name__}: {error}")
            return
        for row, row_labels in zip(batch, labels):
            answers = 1 if captions else sum(message["role"] == "assistant" for message in row["messages"])
            learned = int((row_labels == end_id).sum())
            if end_id is not None and learned < answers:
                detail = f"{end_token} is labelled in {learned} of its {answers} answer(s)"
                findings.add("end_of_turn_outside_loss", row["id"], detail)

    # Arrow rows: images as their stored {"bytes", "path"}, read here once for hashing and decoding.
    rows_seen = tqdm(_raw_rows(rows), total=len(rows), desc="auditing", disable=not progress, mininterval=2)
    for index, row in enumerate(rows_seen):
        sample_id = str(row.get("id") or index)
        conversation = caption_to_conversation(row | {"image": None}, prompt) if captions else row
        token_ids, mask = encode_conversation(processor, conversation["messages"])
        ids.append(sample_id)
        tokens.append(len(token_ids))
        needed.append(_needed(token_ids, mask, processor.image_token_id))
        problem = token_problem(token_ids, mask, processor.image_token_id, max_length)
        if problem is not None:
            reason, detail = problem
            if reason == "answer_truncated" and not any(mask[:max_length]):
                reason = "labels_all_masked"
            findings.add(reason, sample_id, detail)

        images, digests = _read_images([row["image"]] if captions else row["images"], sample_id, findings)
        text = row["caption"] if captions else row["messages"]
        seen.setdefault((tuple(digests), json.dumps(text, sort_keys=True)), []).append(sample_id)

        if problem is None and images is not None:
            batch.append(
                {"id": sample_id, "image": images[0], "caption": row["caption"]}
                if captions
                else {"id": sample_id, "images": images, "messages": row["messages"]}
            )
            if len(batch) == batch_size:
                run_collator(batch)
                batch = []
    if batch:
        run_collator(batch)
    for copies in seen.values():  # all of them: which copy is the original, the shuffled order cannot say
        for copy in copies if len(copies) > 1 else []:
            findings.add("duplicate", copy, f"{len(copies)} copies: {', '.join(map(repr, copies[:SHOWN_IDS]))}")
    return Report(
        dataset=dataset if isinstance(dataset, str) else "<Dataset>",
        stage=stage,
        max_length=max_length,
        ids=ids,
        tokens=tokens,
        needed=needed,
        findings=findings.collect(on_error),
        on_error=on_error,
    )


class _Findings:
    """Counts, first ids and the first detail per kind."""

    def __init__(self):
        self.counts = Counter()
        self.ids: dict[str, list[str]] = {}
        self.details: dict[str, str] = {}

    def add(self, kind: str, sample_id: str, detail: str) -> None:
        self.counts[kind] += 1
        ids = self.ids.setdefault(kind, [])
        if len(ids) < 100:
            ids.append(str(sample_id))
        self.details.setdefault(kind, detail)

    def add_report(self, report: dict) -> None:
        """A loader's skip report (`SampleErrors.report()`): counts by reason and the first examples of each."""
        for reason, count in report["counts"].items():
            examples = report.get("examples", {}).get(reason) or [[report["first_ids"][reason], ""]]
            self.counts[reason] += count
            self.ids.setdefault(reason, []).extend(sample_id for sample_id, _ in examples)
            self.details.setdefault(reason, examples[0][1])

    def collect(self, on_error: str) -> list[Finding]:
        findings = [
            Finding(
                kind,
                kind in ALWAYS_BLOCKING or (kind in REJECTED and on_error == "raise"),
                self.counts[kind],
                self.ids[kind],
                self.details[kind],
            )
            for kind in KINDS
            if self.counts[kind]
        ]
        return sorted(findings, key=lambda finding: not finding.blocking)  # stable: KINDS order within each


def _load(dataset, stage: int, image_folder, limit, seed: int, findings: _Findings) -> Dataset:
    """The stage's rows as the scripts load them, every rejected sample recorded in `findings` instead of raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if isinstance(dataset, Dataset):
            rows = (load_captions if stage == 1 else load_conversations)(dataset, image_folder, on_error="skip")
            rows = rows.select(range(min(limit, len(rows)))) if limit else rows
        else:
            load = caption_dataset if stage == 1 else conversation_dataset
            rows = load(dataset, max_samples=limit, seed=seed, image_folder=image_folder, on_error="skip")
    for warning in caught:
        if isinstance(warning.message, SkippedSamplesWarning) and warning.message.report:
            findings.add_report(warning.message.report)
        else:  # not ours to swallow
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return rows


def _raw_rows(rows: Dataset):
    """Rows as plain dicts with undecoded images; `Dataset.cast_column` would copy a `List(Image)` column."""
    for table in rows.with_format("arrow").iter(batch_size=256):
        yield from table.to_pylist()


def _needed(ids: list[int], mask: list[int], image_token_id: int) -> int:
    """One past the last image or answer token: the smallest max_length for which `token_problem` finds no cut."""
    kept = [i for i, (token, flag) in enumerate(zip(ids, mask)) if flag or token == image_token_id]
    return kept[-1] + 1 if kept else 0


def _end_of_turn(processor) -> str | None:
    """The token that closes an assistant turn: the known template's (`END_OF_TURN`), else the tokenizer's EOS."""
    for name, template in CHAT_TEMPLATES.items():
        if processor.chat_template == template and name in END_OF_TURN:
            return END_OF_TURN[name]
    return processor.tokenizer.eos_token


def _read_images(entries: list[dict], sample_id: str, findings: _Findings) -> tuple[list | None, list[str]]:
    """Decode a sample's stored images as training will (RGB) and hash their bytes: `(images or None, digests)`."""
    images, digests = [], []
    for entry in entries:
        try:
            data = entry["bytes"] if entry["bytes"] is not None else Path(entry["path"]).read_bytes()
            image = load_image(data, sample_id)
        except (BadSampleError, OSError) as error:  # a file changed or vanished since the loaders validated it
            findings.add(getattr(error, "reason", "missing_image"), sample_id, str(error))
            return None, digests
        digests.append(hashlib.sha256(data).hexdigest())
        images.append(image)
        mode = source_mode(data)
        if mode not in USUAL_MODES:
            findings.add("odd_image_mode", sample_id, f"mode {mode}")
        _check_image(image, sample_id, findings)
    return images, digests


def _check_image(image, sample_id: str, findings: _Findings) -> None:
    width, height = image.size
    if min(width, height) < TINY_SIDE:
        findings.add("tiny_image", sample_id, f"{width}x{height} px (shortest side under {TINY_SIDE})")
    if width * height > HUGE_PIXELS:
        findings.add("huge_image", sample_id, f"{width}x{height} px (over {HUGE_PIXELS} pixels)")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        findings.add("extreme_aspect_ratio", sample_id, f"{width}x{height} px (over {MAX_ASPECT_RATIO:g}:1)")


@dataclass
class DoctorArguments(DataArguments):
    """The run to audit, beside the scripts' data arguments (`max_samples` audits what that run would train on)."""

    stage: int = field(
        default=2, metadata={"help": "1: captions (train_stage1.py), 2: conversations.", "choices": [1, 2]}
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Training's truncation length; default as the stage's script (1: none, 2: 1024)."},
    )
    prompt: str = field(default=DEFAULT_CAPTION_PROMPT, metadata={"help": "Stage 1's user turn before each caption."})
    seed: int = field(default=42, metadata={"help": "The run's seed (which rows max_samples / limit keep)."})
    limit: int | None = field(default=None, metadata={"help": "Audit this many samples at most."})
    output: str | None = field(default=None, metadata={"help": "Write the Markdown report here (it is also printed)."})
    json: str | None = field(default=None, metadata={"help": "Write the report as JSON here."})
    histogram: str | None = field(default=None, metadata={"help": "Write a PNG histogram of token lengths here."})


def main(model_args: ModelArguments, args: DoctorArguments) -> Report:
    """Audit, write what was asked for, print the Markdown report; the caller exits 1 on a blocking finding."""
    for path in (args.output, args.json, args.histogram):  # before the audit, which may take long
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if model_args.model_name_or_path is not None:
        processor = VLMProcessor.from_pretrained(model_args.model_name_or_path)
    else:  # a new VLM, as stage 1 composes it: its processor
        processor = load_vlm(model_args)[1]
    max_length = args.max_length
    if max_length is None and args.stage == 2:
        max_length = SFTConfig.__dataclass_fields__["max_length"].default
    limits = [n for n in (args.max_samples, args.limit) if n]
    report = audit(
        args.dataset,
        processor,
        args.stage,
        max_length,
        image_folder=args.image_folder,
        on_error=args.on_error,
        limit=min(limits) if limits else None,
        prompt=args.prompt,
        seed=args.seed,
    )
    if args.histogram:
        report.save_histogram(args.histogram)
    # The report links the figure relative to where the report is written.
    start = os.path.dirname(os.path.abspath(args.output)) if args.output else os.getcwd()
    markdown = report.to_markdown(args.histogram and os.path.relpath(args.histogram, start))
    if args.output:
        Path(args.output).write_text(markdown)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    print(markdown)
    return report


if __name__ == "__main__":
    # Unknown keys of a training recipe given with --config (learning_rate, output_dir, ...) are ignored.
    parsed = TrlParser((ModelArguments, DoctorArguments)).parse_args_and_config(fail_with_unknown_args=False)
    sys.exit(1 if main(*parsed).blocking else 0)
