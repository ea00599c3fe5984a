"""Generation speed and memory: hf_vlm against Llava built from the same sub-configs, with the same weights.

    python benchmarks/generation.py              # the committed run: 16 repetitions, 10 min on 2 quiet CPU cores
    python benchmarks/generation.py --quick      # tiny random backbones, seconds (a test runs it)

The default size is a random SigLIP tower shaped like siglip-base-patch16-224 (196 patches at 224 px) and a
random Llama LM with SmolLM2-135M's sizes, the `mlp` projector, built from configs here (no Hub, no downloads).
The demo's CNN tower has no Llava form, so it is not used. Llava is made by `hf_vlm.convert`'s `llava_config` and
`copy_weights` (what `to_llava` does to the model): every weight is a copy of hf_vlm's.

- `generate`: greedy, exactly 64 new tokens (`min_new_tokens=64`), at batch 1 and batch 8; new tokens/s of the
  whole call (tower, prefill and decoding). Time to first token: `generate` with `max_new_tokens=1`, batch 1.
  One warm-up call each, then hf_vlm and Llava alternate in every repetition (machine drift hits both), who goes
  first alternating between repetitions (an even --repeats gives each the lead equally often); each model's
  median with its (min-max), and as the ratio the median of the paired ratios within repetitions, with theirs.
- Vision-tower calls per `generate` call: a forward hook on each model's `vision_tower`, counted in every timed call.
- Peak memory: the most bytes of torch tensors alive at once during one call, above what was alive before it,
  from `torch.profiler`'s memory events (every allocation and free of the CPU allocator, in time order); on CUDA,
  `torch.cuda.max_memory_allocated` above the memory allocated before the call. Weights and inputs are not
  counted (the same for both). One training step (forward, backward, AdamW step, projector + LM trained, tower
  frozen, batch 8, a fresh optimizer, so its state is counted) and one `generate` call (batch 1, 64 new tokens).
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

from hf_vlm import VLMConfig, VLMForConditionalGeneration
from hf_vlm.convert import copy_weights, llava_config
from hf_vlm.training import set_trainable

RESULTS = Path(__file__).parent / "results"
NEW_TOKENS = 64
TEXT_TOKENS = 16  # of each prompt, around its image tokens


def configs(quick: bool) -> tuple[SiglipVisionConfig, LlamaConfig]:
    """The towers' sub-configs: siglip-base-patch16-224 and SmolLM2-135M's sizes, or the tests' tiny ones."""
    if quick:
        vision = SiglipVisionConfig(
            image_size=16,
            patch_size=4,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        )
        text = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
        )
        return vision, text
    vision = SiglipVisionConfig(
        image_size=224,
        patch_size=16,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
    )
    text = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return vision, text


def build(quick: bool, device: str) -> dict:
    """hf_vlm's `mlp` model and the Llava with a copy of its weights, in eval mode."""
    vision, text = configs(quick)
    torch.manual_seed(0)
    config = VLMConfig(
        vision_config=vision,
        text_config=text,
        projector_type="mlp",
        image_token_id=text.vocab_size - 1,
        # Llava selects hidden states; SigLIP's last_hidden_state has been through a norm that none of them has.
        vision_feature_layer=-1,
        tie_word_embeddings=True,
    )
    ours = VLMForConditionalGeneration(config).to(device).eval()
    llava = copy_weights(ours, LlavaForConditionalGeneration, llava_config(ours)).eval()
    return {"hf_vlm": ours, "Llava": llava}


def inputs(model, batch_size: int) -> dict:
    """A batch of prompts: 2 text tokens, the image's tokens, the rest of the text; random pixels."""
    config, generator = model.config, torch.Generator().manual_seed(batch_size)
    image_token_id, size = config.image_token_id, config.vision_config.image_size
    text = torch.randint(3, image_token_id, (batch_size, TEXT_TOKENS), generator=generator)
    image = torch.full((batch_size, config.image_seq_length), image_token_id)
    input_ids = torch.cat([text[:, :2], image, text[:, 2:]], dim=1)
    pixel_values = torch.randn(batch_size, 3, size, size, generator=generator)
    return {
        "input_ids": input_ids.to(model.device),
        "attention_mask": torch.ones_like(input_ids).to(model.device),
        "pixel_values": pixel_values.to(model.device),
    }


def generate(model, batch: dict, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=2
        )


def timed(call, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_bytes(call, device: str) -> int:
    """The most tensor bytes alive at once during `call()`, above those alive before it (see the docstring)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    changes = sorted(allocations(prof.profiler.kineto_results.experimental_event_tree()))
    alive = peak = 0
    for _, change in changes:
        alive += change
        peak = max(peak, alive)
    return peak


def allocations(nodes):
    """(time, bytes) of every allocation (positive) and free (negative) in the profiler's event tree."""
    for node in nodes:
        if node.tag == _EventType.Allocation:
            yield node.start_time_ns, node.extra_fields.alloc_size
        yield from allocations(node.children)


def train_step(model, batch: dict) -> None:
    """Forward, backward and a fresh AdamW's step, projector + LM trained (the stage-2 setting); then restore."""
    set_trainable(model, vision=False, projector=True, language=True)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()


def training_batch(model, batch_size: int) -> dict:
    batch = inputs(model, batch_size)
    length = batch["input_ids"].shape[1]
    batch["labels"] = batch["input_ids"].masked_fill(torch.arange(length, device=model.device) < length - 8, -100)
    return batch


# The rows measured in every repetition: the timed call whose seconds they come from, and how seconds become the
# row's value.
REPEATED = {
    "tokens_per_s_batch_1": ("generate_batch_1", lambda s: NEW_TOKENS / s),
    "tokens_per_s_batch_8": ("generate_batch_8", lambda s: 8 * NEW_TOKENS / s),
    "time_to_first_token_s": ("time_to_first_token", lambda s: s),
}


def measure(models: dict, repeats: int, device: str) -> dict:
    """Per model: medians of interleaved repetitions, tower calls per `generate`, peak memory; and whether both
    generated the same tokens at batch 8."""
    tower_calls = {name: [] for name in models}
    counting = dict.fromkeys(models, 0)
    for name, model in models.items():
        model.model.vision_tower.register_forward_hook(
            lambda *_, name=name: counting.__setitem__(name, counting[name] + 1)
        )

    outputs = {}

    def counted(name, what, call):
        counting[name] = 0
        seconds = timed(lambda: outputs.__setitem__((name, what), call()), device)
        tower_calls[name].append(counting[name])
        return seconds

    batches = {(name, b): inputs(model, b) for name, model in models.items() for b in (1, 8)}
    for name, model in models.items():  # warm-up
        generate(model, batches[name, 1], 2)
    calls = [("time_to_first_token", 1, 1), ("generate_batch_1", 1, NEW_TOKENS), ("generate_batch_8", 8, NEW_TOKENS)]
    times = {(name, what): [] for name in models for what, _, _ in calls}
    progress = tqdm(total=repeats * len(calls) * len(models), desc="timed generate calls")
    for repetition in range(repeats):
        # Who goes first alternates (ABBA), so a call's effect on the next (caches, clocks) falls on both alike.
        order = list(models.items())[:: 1 if repetition % 2 == 0 else -1]
        for what, batch_size, new_tokens in calls:
            for name, model in order:
                batch = batches[name, batch_size]
                times[name, what].append(counted(name, what, lambda: generate(model, batch, new_tokens)))  # noqa: B023
                progress.update()

    results = {}
    for name, model in models.items():
        train = training_batch(model, 8)
        results[name] = {
            **{key: value(statistics.median(times[name, what])) for key, (what, value) in REPEATED.items()},
            "train_step_peak_mib": peak_bytes(lambda: train_step(model, train), device) / 2**20,  # noqa: B023
            "generate_peak_mib": peak_bytes(lambda: generate(model, batches[name, 1], NEW_TOKENS), device) / 2**20,  # noqa: B023
            "vision_tower_calls_per_generate": sorted(set(tower_calls[name])),
            "seconds_per_repetition": {what: times[name, what] for what, _, _ in calls},
        }
    progress.close()
    # The same weights, greedy: the same tokens, unless rounding flips a near-tie.
    same_tokens = torch.equal(*(outputs[name, "generate_batch_8"] for name in models))
    return results, same_tokens


ROWS = (
    ("generate, batch 1, new tokens / s", "tokens_per_s_batch_1", "{:.1f}", True),
    ("generate, batch 8, new tokens / s", "tokens_per_s_batch_8", "{:.1f}", True),
    ("time to first token, batch 1, s", "time_to_first_token_s", "{:.3f}", False),
    ("peak memory, one training step, MiB", "train_step_peak_mib", "{:.1f}", False),
    ("peak memory, one generate call, MiB", "generate_peak_mib", "{:.1f}", False),
)


def report_table(results: dict) -> tuple[str, dict]:
    """The Markdown table and the ratios hf_vlm / Llava (above 1 is better for throughput, below 1 for the rest).

    A timed row gives each model's median with its (min-max) over repetitions, and as the ratio the median of the
    ratios within each repetition, where hf_vlm and Llava ran back to back, with their (min-max). A memory row is
    measured once: its ratio is of the two values."""
    ours, llava = results["hf_vlm"], results["Llava"]
    ratios = {}
    lines = ["| | hf_vlm | Llava | hf_vlm / Llava |", "|---|---:|---:|---:|"]
    for label, key, fmt, higher_better in ROWS:
        better = "higher is better" if higher_better else "lower is better"
        cells = [fmt.format(ours[key]), fmt.format(llava[key])]
        if key in REPEATED:
            seconds, value = REPEATED[key]
            per_run = [[value(t) for t in r["seconds_per_repetition"][seconds]] for r in (ours, llava)]
            paired = [a / b for a, b in zip(*per_run, strict=True)]
            ratios[key] = statistics.median(paired)
            cells = [f"{cell} ({fmt.format(min(v))}-{fmt.format(max(v))})" for cell, v in zip(cells, per_run)]
            cells.append(f"{ratios[key]:.2f} ({min(paired):.2f}-{max(paired):.2f})")
        else:
            ratios[key] = ours[key] / llava[key]
            cells.append(f"{ratios[key]:.2f}")
        lines.append(f"| {label} ({better}) | " + " | ".join(cells) + " |")
    calls = [", ".join(map(str, r["vision_tower_calls_per_generate"])) for r in (ours, llava)]
    lines.append(f"| vision-tower calls per generate call | {calls[0]} | {calls[1]} | |")
    return "\n".join(lines) + "\n", ratios


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="tiny random backbones, for a smoke test")
    parser.add_argument("--output_dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    models = build(args.quick, device)
    results, identical = measure(models, args.repeats, device)
    table, ratios = report_table(results)

    size = (
        "tiny random backbones (--quick)"
        if args.quick
        else "a random SigLIP tower shaped like siglip-base-patch16-224 (196 patches at 224 px) and a random LM with "
        "SmolLM2-135M's sizes, `mlp` projector"
    )
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {device}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    command = "python benchmarks/generation.py" + (" --quick" if args.quick else "") + f" --repeats {args.repeats}"
    memory = "torch.cuda.max_memory_allocated" if device == "cuda" else "torch.profiler memory events (tensor bytes)"
    report = (
        f"# Generation: hf_vlm against Llava\n\n`{command}` on {machine}; fp32; {size}; Llava has a copy of hf_vlm's "
        f"weights; greedy, exactly {NEW_TOKENS} new tokens; medians of {args.repeats} interleaved repetitions; peak "
        f"memory above the weights and inputs, from {memory}; (min-max) over repetitions; the ratio of a timed row is "
        f"the median of the repetitions' paired ratios. Both generated the same tokens (batch 8): "
        f"{'yes' if identical else 'no'}.\n\n{table}"
    )
    print(report)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "generation.md").write_text(report)
    record = {
        "command": command,
        "machine": machine,
        "size": size,
        "memory_method": memory,
        "repeats": args.repeats,
        "new_tokens": NEW_TOKENS,
        "same_tokens": identical,
        "results": results,
        "ratios_hf_vlm_over_llava": ratios,
    }
    (output / "generation.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count())
    main()
