"""Share a VLM on the Hugging Face Hub: one commit with weights, processor, remote code and a model card.

    from hf_vlm.hub import push

    push(model, processor, "user/tiny-vlm", datasets=["user/easy-vqa-conversations"],
         eval_results={"dataset": {"name": "easy-VQA test subset", "type": "easy_vqa", "split": "test"},
                       "metrics": {"vqa_accuracy": 0.816}})

Anyone can then load it without hf_vlm installed:
`AutoModelForImageTextToText.from_pretrained("user/tiny-vlm", trust_remote_code=True)` (and `AutoProcessor`
likewise); with hf_vlm imported the Auto classes need no `trust_remote_code`. `model.push_to_hub(repo_id)` and
`processor.push_to_hub(repo_id)` work on their own too (two commits, no card); `push` is the one-commit version.

This module is not shipped with checkpoints; it may import anything.
"""

from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import CommitInfo, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError

from .modeling import VLMForConditionalGeneration
from .paths import cache_root, is_hub_id
from .processing import VLMProcessor
from .saving import scratch_folder

TAGS = ["hf_vlm", "vision-language", "image-text-to-text", "custom_code"]
EXAMPLE_QUESTION = "What is in the image?"


def model_card(
    model: VLMForConditionalGeneration,
    *,
    repo_id: str,
    base_model: list[str] | None = None,
    datasets: list[str] | None = None,
    eval_results: dict | list[dict] | None = None,
    training: str | None = None,
    license: str | None = None,
    tags: list[str] | None = None,
) -> ModelCard:
    """A model card: Hub metadata, what the model is, how it was trained and scored, and a usage snippet.

    The snippet asks one question through the processor's chat template (`build_vlm` always sets one).

    Args:
        model: the model to describe; its config gives the architecture.
        repo_id: the full repo id (`"user/name"`) that the usage snippet loads.
        base_model: Hub ids of the backbones. By default the `_name_or_path` of `config.vision_config` and
            `config.text_config` (what `build_vlm` was given), keeping only Hub ids: a local folder means
            nothing to a reader, so a model built from folders lists none unless they are given here.
        datasets: Hub ids of the training data (`Dataset.push_to_hub` puts it there).
        eval_results: one report or a list of them, each
            `{"dataset": {"name": str, "type": str, "split": str (optional)}, "metrics": {name: value},
            "task": str (optional, default "image-text-to-text")}`, e.g.
            `{"dataset": {"name": "easy-VQA test subset", "type": "easy_vqa", "split": "test"},
            "metrics": {"vqa_accuracy": 0.816}}`. They become the card's model-index and a results table.
        training: Markdown saying how the model was trained; becomes the "Training" section.
        license: a Hub license id such as `"apache-2.0"`.
        tags: extra tags, after `TAGS`.
    """
    config = model.config
    if base_model is None:
        names = [config.vision_config._name_or_path, config.text_config._name_or_path]
        base_model = [name for name in names if is_hub_id(name)]
    reports = [eval_results] if isinstance(eval_results, dict) else list(eval_results or [])
    data = ModelCardData(
        model_name=repo_id.split("/")[-1],
        pipeline_tag="image-text-to-text",
        library_name="transformers",
        tags=TAGS + [tag for tag in tags or [] if tag not in TAGS],
        base_model=base_model or None,
        datasets=datasets or None,
        license=license,
        eval_results=[result for report in reports for result in _eval_results(report)] or None,
    )

    vision = config.vision_config
    vision_name = getattr(vision, "architecture", None) or vision.model_type  # timm_wrapper names its network
    parts = [
        ("Vision tower", vision_name, model.model.vision_tower),
        ("Projector", config.projector_type, model.model.multi_modal_projector),
        ("Language model", config.text_config.model_type, model.model.language_model),
    ]
    body = [
        f"# {repo_id.split('/')[-1]}",
        f"A vision-language model built with `hf_vlm`: image -> vision tower (`{vision_name}`) -> projector "
        f"(`{config.projector_type}`) -> language model (`{config.text_config.model_type}`) -> text. Each "
        f"{config.image_size}x{config.image_size} image becomes {config.image_seq_length} tokens in the language "
        "model's input.",
        "| part | type | parameters |\n|---|---|---|\n"
        + "\n".join(
            f"| {name} | {kind} | {sum(p.numel() for p in module.parameters()):,} |" for name, kind, module in parts
        ),
    ]
    if base_model:
        body.append("Backbones: " + ", ".join(f"[{name}](https://huggingface.co/{name})" for name in base_model) + ".")
    body += [
        "## Usage",
        _usage(repo_id, config.image_size),
        "The model code (`configuration_vlm.py`, `modeling_vlm.py`, `projectors.py`, `processing_vlm.py`) is "
        "in this repo, hence `trust_remote_code=True`. With `hf_vlm` installed and imported, the Auto classes "
        "load it without remote code.",
    ]
    if training:
        body += ["## Training", training.strip()]
    if reports:
        rows = [
            f"| {r['dataset']['name']} | {r['dataset'].get('split', '')} | {metric} | {_format(value)} |"
            for r in reports
            for metric, value in r["metrics"].items()
        ]
        body += ["## Results", "| dataset | split | metric | value |\n|---|---|---|---|\n" + "\n".join(rows)]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(body) + "\n")


def push(
    model: VLMForConditionalGeneration,
    processor: VLMProcessor,
    repo_id: str,
    *,
    commit_message: str = "Upload VLM: weights, processor, model code and model card",
    private: bool = False,
    revision: str | None = None,
    card: ModelCard | None = None,
    **card_kwargs,
) -> CommitInfo:
    """Push model (safetensors), processor, their code and a model card to `repo_id` in one commit.

    The repo is created if needed. `card` replaces the generated card; otherwise `card_kwargs` go to
    `model_card`. `revision` is the branch to commit to (default main). Returns the `CommitInfo`; its `oid` is
    the commit sha that `from_pretrained(revision=...)` takes. The Hub applies a commit whole or not at all, so
    when any Hub call fails (an unreachable endpoint, a refused repo, a file that fails to upload) this raises a
    `RuntimeError` naming the repo, the endpoint and the client's error (which names the file), and the repo keeps
    its previous commit.

    The folder uploaded is a copy under `$HF_VLM_CACHE/push-tmp` (default `~/.cache/hf_vlm/push-tmp`), removed
    when the push ends, however it ends; a copy that a killed push left there goes with the next push.
    """
    api = HfApi()
    with _hub_call(api, repo_id):
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id  # "name" -> "user/name"
    card = card or model_card(model, repo_id=repo_id, **card_kwargs)
    with scratch_folder(_push_copies()) as folder:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        card.save(folder / "README.md")
        with _hub_call(api, repo_id):
            return api.upload_folder(
                repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision
            )


def _push_copies() -> Path:
    return cache_root() / "push-tmp"


@contextmanager
def _hub_call(api: HfApi, repo_id: str):
    """Any failure of the Hub calls inside becomes one `RuntimeError` that says which repo, where and why."""
    try:
        yield
    except Exception as error:
        raise RuntimeError(f"Pushing to {repo_id} at {api.endpoint} failed: {_explain(error)}") from error


def _explain(error: BaseException) -> str:
    """The error's message and its causes', down to the Hub's answer (an LFS failure names the file on top and
    the reason underneath)."""
    messages = []
    while error is not None and len(messages) < 3:
        messages.append(" ".join(str(error).split()))
        if isinstance(error, HfHubHTTPError):
            break
        error = error.__cause__
    return "; caused by: ".join(messages)


def _eval_results(report: dict) -> list[EvalResult]:
    dataset = report["dataset"]
    return [
        EvalResult(
            task_type=report.get("task", "image-text-to-text"),
            dataset_type=dataset["type"],
            dataset_name=dataset["name"],
            dataset_split=dataset.get("split"),
            metric_type=metric,
            metric_name=metric,
            metric_value=value,
        )
        for metric, value in report["metrics"].items()
    ]


def _format(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _usage(repo_id: str, image_size: int) -> str:
    """A snippet that runs as written: load, ask one question about an image, print the answer."""
    return f"""```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{repo_id}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)

image = Image.new("RGB", ({image_size}, {image_size}), "red")  # or Image.open("photo.jpg")
messages = [{{"role": "user", "content": [
    {{"type": "image", "image": image}},
    {{"type": "text", "text": "{EXAMPLE_QUESTION}"}},
]}}]
inputs = processor.apply_chat_template(
    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
)
generated = model.generate(**inputs, max_new_tokens=32, do_sample=False)
print(processor.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```"""


__all__ = ["model_card", "push"]
