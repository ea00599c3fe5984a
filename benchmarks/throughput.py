"""Training throughput: what the feature cache and the labelled-positions loss buy, and hf_vlm against Llava.

    python benchmarks/throughput.py                      # ~8 min on 2 CPU cores; writes benchmarks/results/throughput.{md,json}
    python benchmarks/throughput.py --rounds 1           # a smoke run, ~3 min

One training step = forward, backward, AdamW step, on one batch, in fp32. Every variant of a table runs once
per round, in turn (interleaved, so drifts of the machine hit all alike), after one warm-up step each; the
table gives the median over rounds as samples/s and as a ratio to the first row, all from this one run.

1. Stage 1 and stage 2 of the demo recipe (EfficientNet-Lite0 at 128 px, `pixel_shuffle`, SmolLM2-135M-Instruct;
   easy-VQA captions, batch 32, projector trained / questions, batch 16, projector + LM trained), before and
   after each change. "before" is what the code did without them: the tower on pixels at every step, and the LM
   head over every position (stage 1: `Trainer`'s full logits; stage 2: TRL's fused LM head, which scores every
   position off Triton devices).
2. hf_vlm against `transformers.LlavaForConditionalGeneration` built from the same sub-configs (a random
   SigLIP tower, 16 patches at 128 px, and SmolLM2-135M's Llama config), the same `mlp` projector and the same
   batch (16 samples of 16 image tokens + 24 text tokens, 4 labelled), so both see equal tokens.
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import transformers
import trl
from transformers import LlamaConfig, LlavaForConditionalGeneration, SiglipVisionConfig
from trl.trainer.utils import add_fused_lm_head

from hf_vlm import VLMConfig, VLMForConditionalGeneration, build_vlm
from hf_vlm.convert import copy_weights, llava_config
from hf_vlm.data import CaptionCollator, ConversationCollator, easy_vqa_captions, easy_vqa_conversations
from hf_vlm.feature_cache import VisionFeatureCache
from hf_vlm.offline.pretrained_parts import efficientnet_lite0, smollm2_135m_instruct
from hf_vlm.training import set_trainable

RESULTS = Path(__file__).parent / "results"


def train_step(model, optimizer, batch: dict, loss_of) -> None:
    loss_of(model, batch).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def full_logits_loss(model, batch):
    """What stage 1's `Trainer` paid before: logits at every position, then the loss."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    return model.loss_function(
        logits=logits, labels=batch["labels"], vocab_size=model.config.get_text_config().vocab_size
    )


def own_loss(model, batch):
    """The model's loss from `labels`: hf_vlm projects the labelled positions only, Llava every position."""
    return model(**batch).loss


def trl_fused_loss(model, batch):
    """What stage 2's `SFTTrainer` paid before on this device: TRL's fused LM head."""
    return model(**batch, fused_lm_head=True).loss


def measure(variants: dict, rounds: int) -> dict[str, float]:
    """Median seconds per step of each variant: one warm-up each, then `rounds` interleaved rounds."""
    for step in variants.values():
        step()
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, step in variants.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def table(title: str, seconds: dict[str, float], batch_size: int) -> tuple[str, list[dict]]:
    first = next(iter(seconds.values()))
    rows = [
        {"variant": name, "s_per_step": s, "samples_per_s": batch_size / s, "ratio": first / s}
        for name, s in seconds.items()
    ]
    lines = [
        f"**{title}** (batch {batch_size})",
        "",
        "| variant | s / step | samples / s | vs first row |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['variant']} | {r['s_per_step']:.2f} | {r['samples_per_s']:.1f} | {r['ratio']:.2f}x |" for r in rows
    ]
    return "\n".join(lines) + "\n", rows


def each_change(
    model, optimizer, batch: dict, cached: dict, before_loss, before: str, rounds: int
) -> dict[str, float]:
    """Seconds per step before the changes (pixels, `before_loss`), with each change alone, and with both."""
    return measure(
        {
            before: lambda: train_step(model, optimizer, batch, before_loss),
            "feature cache": lambda: train_step(model, optimizer, cached, before_loss),
            "labelled-positions loss": lambda: train_step(model, optimizer, batch, own_loss),
            "both (the script now)": lambda: train_step(model, optimizer, cached, own_loss),
        },
        rounds,
    )


def swap_in_features(batch: dict, cache: VisionFeatureCache, images: list) -> dict:
    features = {k: v for k, v in batch.items() if k != "pixel_values"}
    features["vision_features"] = cache.lookup(images)
    return features


def recipe_tables(vision: str, text: str, rounds: int, stage1_batch: int, stage2_batch: int, cache_dir: str) -> list:
    """Stage 1 and stage 2 of the demo recipe, before and after each change."""
    torch.manual_seed(0)
    model, processor = build_vlm(vision, text, "pixel_shuffle", image_size=128)
    cache = VisionFeatureCache(model, processor, cache_dir)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does
    model.train()

    captions = easy_vqa_captions("train").select(range(stage1_batch))
    caption_images = [row["image"].convert("RGB") for row in captions]
    questions = easy_vqa_conversations("train").shuffle(seed=0).select(range(stage2_batch))
    question_images = [row["images"][0].convert("RGB") for row in questions]
    cache.encode(caption_images + question_images)
    stage1 = CaptionCollator(processor)(list(captions))
    stage2 = ConversationCollator(processor)(list(questions))
    stage1_cached, stage2_cached = (
        swap_in_features(stage1, cache, caption_images),
        swap_in_features(stage2, cache, question_images),
    )

    results = []
    set_trainable(model, vision=False, projector=True, language=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    seconds = each_change(
        model, optimizer, stage1, stage1_cached, full_logits_loss, "before: tower every step, full logits", rounds
    )
    results.append(
        table(
            f"Stage 1 of the demo recipe ({int(stage1['attention_mask'].sum(1).float().mean())} tokens a sample)",
            seconds,
            stage1_batch,
        )
    )

    set_trainable(model, vision=False, projector=True, language=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    before = "before: tower every step, TRL's fused head on every position"
    seconds = each_change(model, optimizer, stage2, stage2_cached, trl_fused_loss, before, rounds)
    results.append(
        table(
            f"Stage 2 of the demo recipe ({int(stage2['attention_mask'].sum(1).float().mean())} tokens a sample)",
            seconds,
            stage2_batch,
        )
    )
    return results


def llava_tables(text_config: LlamaConfig, rounds: int, batch_size: int) -> list:
    """hf_vlm against Llava from the same sub-configs, the same projector and the same batch."""
    vision_config = SiglipVisionConfig(
        image_size=128,
        patch_size=32,
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=6,
    )
    image_token_id = text_config.vocab_size - 1
    common = dict(
        vision_config=vision_config, text_config=text_config, image_token_id=image_token_id, vision_feature_layer=-1
    )
    torch.manual_seed(0)
    ours = VLMForConditionalGeneration(VLMConfig(projector_type="mlp", **common)).train()
    # The same weights, as to_llava makes them: a copy of every tensor under the same name.
    llava = copy_weights(ours, LlavaForConditionalGeneration, llava_config(ours)).train()

    generator = torch.Generator().manual_seed(0)
    text = torch.randint(0, image_token_id, (batch_size, 24), generator=generator)
    input_ids = torch.cat([text[:, :4], torch.full((batch_size, 16), image_token_id), text[:, 4:]], dim=1)
    labels = input_ids.masked_fill(torch.arange(input_ids.shape[1]) < input_ids.shape[1] - 4, -100)
    pixel_values = torch.randn(batch_size, 3, 128, 128, generator=generator)
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values": pixel_values,
    }
    with torch.no_grad():
        cached = {k: v for k, v in batch.items() if k != "pixel_values"} | {
            "vision_features": ours.get_vision_features(pixel_values)
        }

    results = []
    for stage, language in (
        ("stage-1 setting: projector trains", False),
        ("stage-2 setting: projector + LM train", True),
    ):
        optimizers = {}
        for name, model in (("llava", llava), ("ours", ours)):
            set_trainable(model, vision=False, projector=True, language=language)
            optimizers[name] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        seconds = measure(
            {
                "LlavaForConditionalGeneration (pixels, its loss)": partial(
                    train_step, llava, optimizers["llava"], batch, own_loss
                ),
                "hf_vlm, pixels": partial(train_step, ours, optimizers["ours"], batch, own_loss),
                "hf_vlm, cached vision features": partial(train_step, ours, optimizers["ours"], cached, own_loss),
            },
            rounds,
        )
        results.append(table(f"hf_vlm vs Llava, {stage}", seconds, batch_size))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output_dir", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())

    vision, text = str(efficientnet_lite0(image_size=128)), str(smollm2_135m_instruct())
    text_config = transformers.AutoConfig.from_pretrained(text)

    with tempfile.TemporaryDirectory() as cache_dir:
        tables = recipe_tables(vision, text, args.rounds, 32, 16, cache_dir) + llava_tables(
            text_config, args.rounds, 16
        )

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"
    report = f"# Training throughput\n\n`python benchmarks/throughput.py --rounds {args.rounds}` on {machine}; fp32; medians of {args.rounds} interleaved rounds.\n\n"
    report += "\n".join(text for text, _ in tables)
    print(report)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "throughput.md").write_text(report)
    (output / "throughput.json").write_text(
        json.dumps({"machine": machine, "rounds": args.rounds, "tables": [rows for _, rows in tables]}, indent=2)
        + "\n"
    )


if __name__ == "__main__":
    main()
