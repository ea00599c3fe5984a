"""The projector study: every design trained and evaluated the same way, side by side (`scripts/compare_projectors.py`).

For each design of `DESIGNS` and each seed, stage 1 then stage 2 run through the training scripts' own `main`
functions, on the same backbones, data, sample budget and seed; then the model answers the same held-out easy-VQA
questions with and without the image. Each design and seed runs in its own spawned process, so that its peak
memory (`ru_maxrss` on CPU, `torch.cuda.max_memory_allocated` on a GPU) is its own, and writes its measurements
to `<design>/seed<seed>/run.json`: a rerun with the same settings reuses them, so a failure late in the study
loses only the run that failed. `summarize` aggregates the seeds (mean, min, max, std) and divides each design's
timings by `mlp`'s from the same run; all of it goes to `projectors.json`. `render` then writes from that file
`projectors.md` and two figures (`write_outputs`), and what each trained projector's tokens read
(`draw_trained_token_maps`, `token_maps.png`); `--render_only` redoes just that step.

The library does not import the scripts: the caller passes the two stages as `Stage`s (their `main`, their
dataclasses and a recipe), which a spawned process imports back by name.
"""

import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .cli import stage_arguments
from .data import easy_vqa_captions
from .evaluation import easy_vqa_caption_accuracy, easy_vqa_test_questions, evaluate_vqa
from .modeling import VLMForConditionalGeneration
from .processing import VLMProcessor
from .token_maps import draw_token_maps, token_influence
from .training import trainable_parameters

# Each design is a set of `ModelArguments` fields. Token counts follow from the tower's patch grid (4 x 4 for both
# backbones here: EfficientNet-Lite0 at 128 px, the quick SigLIP at 16 px with 4 px patches), so the compressing
# designs make 4 tokens and the others 16. `pixel_shuffle_r2_no_norm` drops InternVL's LayerNorm: on the CNN's
# unnormalised maps the norm is what let colour through in an earlier run.
DESIGNS = {
    "linear": {"projector_type": "linear"},
    "mlp": {"projector_type": "mlp"},
    "pixel_shuffle_r1": {"projector_type": "pixel_shuffle", "pixel_shuffle_factor": 1},
    "pixel_shuffle_r2": {"projector_type": "pixel_shuffle", "pixel_shuffle_factor": 2},
    "pixel_shuffle_r2_no_norm": {
        "projector_type": "pixel_shuffle",
        "pixel_shuffle_factor": 2,
        "pixel_shuffle_layernorm": False,
    },
    "c_abstractor_4": {"projector_type": "c_abstractor", "projector_num_tokens": 4},
    "c_abstractor_16": {"projector_type": "c_abstractor", "projector_num_tokens": 16},
    "resampler_4": {"projector_type": "resampler", "projector_num_tokens": 4},
    "resampler_16": {"projector_type": "resampler", "projector_num_tokens": 16},
}
QUICK_DESIGNS = ("mlp", "pixel_shuffle_r2", "c_abstractor_4", "resampler_4")


@dataclass
class StudyArguments:
    output_dir: str = field(default="runs/projectors", metadata={"help": "Where the runs and reports go."})
    quick: bool = field(default=False, metadata={"help": "Tiny random backbones and a few steps: a smoke run."})
    designs: str | None = field(
        default=None, metadata={"help": f"Comma-separated keys of DESIGNS; default all ({', '.join(DESIGNS)})."}
    )
    seeds: str = field(default="0,1", metadata={"help": "Comma-separated training seeds; the questions stay fixed."})
    stage1_samples: int | None = field(default=None, metadata={"help": "Captions per design; default 320."})
    stage2_samples: int | None = field(default=None, metadata={"help": "Conversations per design; default 480."})
    eval_questions: int | None = field(default=None, metadata={"help": "Held-out questions; default 200."})
    caption_images: int | None = field(default=None, metadata={"help": "Stage-1 caption check images; default 64."})
    threads: int | None = field(default=None, metadata={"help": "torch threads; default: all cores."})
    render_only: bool = field(
        default=False,
        metadata={
            "help": "Rewrite the table and figures from output_dir's projectors.json and models; train nothing."
        },
    )

    def budget(self) -> dict:
        """The sample budget every design gets: the given values, else the quick or the default ones."""
        # The default fits 9 designs x 2 seeds on the demo's parts into about an hour on 2 CPU cores (measured:
        # docs/projectors.md); stage 2 then stops early in its learning curve, where colour is still being learned.
        default = (64, 64, 32, 16) if self.quick else (320, 480, 200, 64)
        given = (self.stage1_samples, self.stage2_samples, self.eval_questions, self.caption_images)
        names = ("stage1_samples", "stage2_samples", "eval_questions", "caption_images")
        return {name: value or fallback for name, value, fallback in zip(names, given, default)}


@dataclass
class Stage:
    """One training script as the study drives it: `main(*parsed)`, the dataclasses it parses, its YAML recipe."""

    main: Callable
    dataclass_types: tuple
    recipe: str


def tiny_backbones(folder: Path) -> tuple[Path, Path]:
    """A random SigLIP tower (16 px, 4 px patches, width 32) and a random 2-layer Llama with a small BPE tokenizer
    trained on easy-VQA's words, saved as build_vlm takes them. Seeded: the same folders every time."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from .data.easy_vqa import CAPTION_TEMPLATES, COLORS, SHAPES

    torch.manual_seed(0)
    vision, text = folder / "siglip", folder / "llama"
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    SiglipVisionModel(SiglipVisionConfig(**tower, image_size=16, patch_size=4)).save_pretrained(vision)
    SiglipImageProcessor(size={"height": 16, "width": 16}).save_pretrained(vision)

    corpus = [t.format(color=c, shape=s) for t in CAPTION_TEMPLATES for c in COLORS for s in SHAPES]
    corpus += ["What color is the shape? What shape is in the image? Is there a circle? yes no user assistant"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=special, initial_alphabet=alphabet)
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    lm = LlamaConfig(
        **tower,
        num_key_value_heads=1,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(lm).save_pretrained(text)
    tokenizer.save_pretrained(text)
    return vision, text


def run_design(name: str, seed: int, settings: dict, stages: tuple[Stage, Stage], out: Path) -> dict:
    """Train and evaluate one design with one seed, in this process; its measurements as a dict.

    `settings` holds the backbones (`vision`, `text`, `image_size`), the budget and `threads`.
    """
    start = time.perf_counter()
    torch.set_num_threads(settings["threads"])
    stage1, stage2 = stages
    budget, gpu = settings["budget"], torch.cuda.is_available()
    questions = easy_vqa_test_questions(budget["eval_questions"])
    captions = easy_vqa_captions("test").select(range(budget["caption_images"]))
    folder = out / name / f"seed{seed}"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    aligner = stage1.main(
        *stage_arguments(
            stage1.recipe,
            stage1.dataclass_types,
            folder / "stage1",
            vision_model=settings["vision"],
            text_model=settings["text"],
            image_size=settings["image_size"],
            max_samples=budget["stage1_samples"],
            seed=seed,
            **DESIGNS[name],
            **settings["stage1_flags"],
        )
    )
    model = aligner.model
    caption = easy_vqa_caption_accuracy(model, aligner.processing_class, captions)
    tuner = stage2.main(
        *stage_arguments(
            stage2.recipe,
            stage2.dataclass_types,
            folder / "stage2",
            model_name_or_path=folder / "stage1",
            max_samples=budget["stage2_samples"],
            seed=seed,
            **settings["stage2_flags"],
        )
    )
    model = tuner.model
    # No feature cache here: the latency is that of a user's generate call, tower included.
    results = evaluate_vqa(model, tuner.processing_class, questions, batch_size=16, max_new_tokens=8)
    seconds = results["generation_seconds"]["with_image"]
    memory = torch.cuda.max_memory_allocated() if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "design": name,
        "seed": seed,
        "settings": DESIGNS[name],
        "image_seq_length": model.config.image_seq_length,
        "trainable_parameters": {
            "stage1": sum(trainable_parameters(aligner.model).values()),
            "stage2": sum(trainable_parameters(model).values()),
        },
        "train": {"stage1": _train_speed(aligner), "stage2": _train_speed(tuner)},
        # On a CPU, the peak resident memory of this process, which runs this design and seed only.
        "peak_memory_mib": memory / 2**20,
        "latency_ms_per_answer": 1000 * seconds / len(questions),
        "metrics": results["metrics"],
        "stage1_caption_accuracy": caption,
        "wall_s": time.perf_counter() - start,  # process start-up not included
    }


def _train_speed(trainer) -> dict:
    """Samples per second and seconds of `trainer.train()`, from the trainer's closing log entry."""
    last = next(entry for entry in reversed(trainer.state.log_history) if "train_samples_per_second" in entry)
    return {"samples_per_s": last["train_samples_per_second"], "seconds": last["train_runtime"]}


def flat_measurements(run: dict) -> dict[str, float]:
    """The numbers of one run under flat names, which `summarize` aggregates over seeds."""
    values = {
        "image_seq_length": run["image_seq_length"],
        "trainable_stage1": run["trainable_parameters"]["stage1"],
        "trainable_stage2": run["trainable_parameters"]["stage2"],
        "samples_per_s_stage1": run["train"]["stage1"]["samples_per_s"],
        "samples_per_s_stage2": run["train"]["stage2"]["samples_per_s"],
        "train_s": run["train"]["stage1"]["seconds"] + run["train"]["stage2"]["seconds"],
        "peak_memory_mib": run["peak_memory_mib"],
        "latency_ms_per_answer": run["latency_ms_per_answer"],
        "caption_both": run["stage1_caption_accuracy"]["both"],
    }
    for group, metric in run["metrics"].items():
        values[f"accuracy_{group}"] = metric["accuracy"]
        values[f"blind_{group}"] = metric["blind_accuracy"]
    return values


def summarize(runs: list[dict]) -> dict:
    """Per design: mean, min, max and std over seeds of every flat measurement, and timing ratios to `mlp`.

    Ratios divide means: samples/s over mlp's (above 1: faster), latency and train time over mlp's (below 1:
    faster). They are absent when mlp was not part of the run.
    """
    designs = {}
    for run in runs:
        designs.setdefault(run["design"], []).append(flat_measurements(run))
    summary = {}
    for name, seeds in designs.items():
        summary[name] = {
            key: {
                "mean": statistics.fmean(values),
                "min": min(values),
                "max": max(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "n": len(values),
            }
            for key in seeds[0]
            for values in [[seed[key] for seed in seeds]]
        }
    if "mlp" in summary:
        mlp = summary["mlp"]
        for stats in summary.values():
            stats["ratio_to_mlp"] = {
                key: stats[key]["mean"] / mlp[key]["mean"]
                for key in ("samples_per_s_stage1", "samples_per_s_stage2", "train_s", "latency_ms_per_answer")
            }
    return summary


def main(args: StudyArguments, stages: tuple[Stage, Stage], command: list[str] | None = None) -> dict:
    """Run every design and seed (each in a spawned process, or reused from its `run.json` when the settings are
    the same) and write the reports; returns what `projectors.json` holds."""
    out = Path(args.output_dir)
    if args.render_only:
        return render(out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.designs.split(",") if args.designs else list(QUICK_DESIGNS if args.quick else DESIGNS)
    unknown = [name for name in names if name not in DESIGNS]
    if unknown:
        raise ValueError(f"Unknown designs {unknown}; choose from {list(DESIGNS)}.")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    if args.quick:
        vision, text = tiny_backbones(out / "backbones")
        image_size = None  # a ViT fixes its own
        steps = dict(per_device_train_batch_size=16, logging_steps=1)
        # A random LM at the recipe's 1e-4 learns nothing in 4 steps; at this rate it starts answering "yes"/"no".
        stage2_steps = steps | {"learning_rate": 5e-3}
    else:
        from .offline.pretrained_parts import efficientnet_lite0, smollm2_135m_instruct

        vision, text, image_size, steps = efficientnet_lite0(image_size=128), smollm2_135m_instruct(), 128, {}
        stage2_steps = {}
    settings = {
        "vision": str(vision),
        "text": str(text),
        "image_size": image_size,
        "budget": args.budget(),
        "threads": args.threads or os.cpu_count(),
        "stage1_flags": steps,
        "stage2_flags": stage2_steps,
    }

    runs, reused, start = [], [], time.perf_counter()
    # spawn, not fork: a fresh interpreter per design and seed, so ru_maxrss counts that run only.
    context = multiprocessing.get_context("spawn")
    # The design order turns by one per seed, so no design always runs first (on a cold machine) or last.
    for index, seed in enumerate(seeds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            saved = out / name / f"seed{seed}" / "run.json"
            if saved.exists() and (previous := json.loads(saved.read_text()))["settings"] == settings:
                print(f"=== {name}, seed {seed}: reusing {saved} ===", flush=True)
                runs.append(previous["run"])
                reused.append(f"{name}/seed{seed}")
                continue
            print(f"\n=== {name}, seed {seed} ===", flush=True)
            with context.Pool(1) as pool:
                runs.append(pool.apply(run_design, (name, seed, settings, stages, out)))
            saved.write_text(json.dumps({"settings": settings, "run": runs[-1]}, indent=2) + "\n")
    report = {
        "command": command or sys.argv,
        "arguments": asdict(args),
        "settings": settings
        | {"recipes": [stage.recipe for stage in stages], "designs": {n: DESIGNS[n] for n in names}},
        "device": "cuda" if torch.cuda.is_available() else f"cpu ({settings['threads']} threads)",
        "total_s": time.perf_counter() - start,  # this invocation's, without the reused runs
        "reused": reused,
        "runs": runs,
        "summary": summarize(runs),
    }
    (out / "projectors.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return render(out)


def render(out: Path) -> dict:
    """The table, the figures and the token maps (of the first seed's models) from `out`'s `projectors.json`."""
    report = json.loads((out / "projectors.json").read_text())
    write_outputs(report, out)
    seed = report["arguments"]["seeds"].split(",")[0]
    folders = {name: out / name / f"seed{seed}" / "stage2" for name in report["settings"]["designs"]}
    draw_trained_token_maps(folders, easy_vqa_test_questions(1)[0]["images"][0], out)
    return report


def draw_trained_token_maps(folders: dict[str, Path], image, out: Path) -> Path:
    """`token_maps.png`: what each trained projector's tokens read on `image` (`hf_vlm.token_maps`)."""
    maps = {}
    for name, folder in folders.items():
        model, processor = VLMForConditionalGeneration.from_pretrained(folder), VLMProcessor.from_pretrained(folder)
        with torch.no_grad():
            features = model.model.get_vision_features(
                processor.image_processor(image, return_tensors="pt").pixel_values
            )
        maps[name] = token_influence(model.model.multi_modal_projector, features)
    draw_token_maps(maps, image, out / "token_maps.png")
    return out / "token_maps.png"


def markdown_table(summary: dict) -> str:
    """The study's table: one row per design, means with their seed spread (min-max), timings also as ratios of
    means to mlp's."""

    def spread(stats: dict, scale: float = 100, digits: int = 1) -> str:
        return (
            f"{scale * stats['mean']:.{digits}f} ({scale * stats['min']:.{digits}f}-{scale * stats['max']:.{digits}f})"
        )

    def timing(stats: dict, key: str) -> str:
        ratio = f", {stats['ratio_to_mlp'][key]:.2f}x" if "ratio_to_mlp" in stats else ""
        return spread(stats[key], scale=1) + ratio

    types = sorted(
        {key[len("accuracy_") :] for stats in summary.values() for key in stats if key.startswith("accuracy_")}
        - {"overall"}
    )
    header = (
        [
            "design",
            "tokens",
            "trainable params (stage 1 / 2)",
            "samples/s stage 1 (min-max), vs mlp",
            "samples/s stage 2 (min-max), vs mlp",
        ]
        + ["peak memory (MiB)", "latency ms/answer, batch 16 (min-max), vs mlp", "accuracy % (min-max)"]
        + [f"{kind} %" for kind in types]
        + ["blind %", "stage-1 captions right %"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, stats in summary.items():
        cells = [
            name,
            f"{stats['image_seq_length']['mean']:.0f}",
            f"{stats['trainable_stage1']['mean']:,.0f} / {stats['trainable_stage2']['mean']:,.0f}",
            timing(stats, "samples_per_s_stage1"),
            timing(stats, "samples_per_s_stage2"),
            f"{stats['peak_memory_mib']['max']:.0f}",
            timing(stats, "latency_ms_per_answer"),
            spread(stats["accuracy_overall"]),
            *[spread(stats[f"accuracy_{kind}"]) for kind in types],
            spread(stats["blind_overall"]),
            spread(stats["caption_both"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy_against(summary: dict, key: str, label: str, path, dodge: float = 0.0) -> None:
    """Overall accuracy against one measurement (`key`), a point per design with its seed min-max as error bars,
    and the same design's blind accuracy (no image) as a hollow marker: the gap is what the image adds.

    `dodge` shifts design i by (i - centre) * dodge along x, so designs at the same x (token counts) stay apart.
    """
    from matplotlib.figure import Figure  # a bare Figure renders with Agg, no pyplot state

    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.subplots()
    markers = "osD^vP*Xh<>"
    for index, (name, stats) in enumerate(summary.items()):
        x, y, blind = stats[key], stats["accuracy_overall"], stats["blind_overall"]
        marker = markers[index % len(markers)]
        at = x["mean"] + (index - (len(summary) - 1) / 2) * dodge
        bars = axes.errorbar(
            at,
            100 * y["mean"],
            xerr=[[x["mean"] - x["min"]], [x["max"] - x["mean"]]],
            yerr=[[100 * (y["mean"] - y["min"])], [100 * (y["max"] - y["mean"])]],
            fmt=marker,
            capsize=3,
            label=name,
        )
        colour = bars.lines[0].get_color()
        axes.scatter(at, 100 * blind["mean"], marker=marker, facecolors="none", edgecolors=colour)
    axes.set_xlabel(label)
    axes.set_ylabel("VQA accuracy (%)")
    axes.set_ylim(0, 105)
    axes.set_title("Filled: with the image (error bars: min-max over seeds); hollow: blind, no image", fontsize=10)
    axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.savefig(path, dpi=120)


def _reused_note(report: dict) -> str:
    if not report["reused"]:
        return ""
    return f" (and {len(report['reused'])} runs reused from an earlier invocation: {', '.join(report['reused'])})"


def write_outputs(report: dict, out: Path) -> dict[str, Path]:
    """`projectors.md` (the table and the command) and the two figures, from what `projectors.json` holds."""
    paths = {name: out / name for name in ("projectors.md", "accuracy_tokens.png", "accuracy_time.png")}
    budget = report["settings"]["budget"]
    paths["projectors.md"].write_text(
        f"# Projector designs on easy-VQA\n\n`{' '.join(report['command'])}` on {report['device']}, "
        f"{report['total_s']:.0f} s{_reused_note(report)}; seeds {report['arguments']['seeds']}; budget {budget}.\n\n"
        + markdown_table(report["summary"])
    )
    tokens = sorted({stats["image_seq_length"]["mean"] for stats in report["summary"].values()})
    plot_accuracy_against(
        report["summary"],
        "image_seq_length",
        "visual tokens per image (designs side by side at each count)",
        paths["accuracy_tokens.png"],
        dodge=0.25 * (tokens[-1] - tokens[0]) / max(1, len(report["summary"]) - 1),
    )
    plot_accuracy_against(report["summary"], "train_s", "train time, both stages (s)", paths["accuracy_time.png"])
    return paths
