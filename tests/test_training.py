import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments, set_seed
from transformers.optimization import Adafactor
from trl import SFTConfig

from hf_vlm import VLMForConditionalGeneration, VLMProcessor, build_vlm
from hf_vlm.cli import ModelArguments
from hf_vlm.training import VLMTrainer, param_groups, part_of, set_trainable, trainable_parameters

SCRIPTS = Path(__file__).parent.parent / "scripts"


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


stage1, stage2 = load_script("train_stage1"), load_script("train_stage2")

COMMON = dict(
    per_device_train_batch_size=4,
    logging_steps=1,
    report_to="none",
    save_strategy="no",
    use_cpu=True,
    seed=0,
    disable_tqdm=True,
)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def changed_parts(before: dict, after: dict) -> dict[str, bool]:
    """For each part, whether any of its tensors changed (keys as in VLMForConditionalGeneration)."""
    parts = {
        "vision": "model.vision_tower.",
        "projector": "model.multi_modal_projector.",
        "language": ("model.language_model.", "lm_head."),
    }
    return {
        part: any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))
        for part, prefix in parts.items()
    }


def run_stage1(backbones, output_dir, **training):
    model_args = ModelArguments(vision_model=backbones["siglip"], text_model=backbones["llama"])
    args = TrainingArguments(output_dir=str(output_dir), **(COMMON | dict(max_steps=3, learning_rate=1e-2) | training))
    return stage1.main(model_args, stage1.DataArguments(max_samples=16), args)


def test_stage1_trains_the_projector_only(backbones, tmp_path):
    """Stage 1 changes projector weights; every vision and LM weight and buffer stays bit-identical."""
    set_seed(0)  # the script seeds with TrainingArguments.seed before it builds the model
    before = snapshot(build_vlm(backbones["siglip"], backbones["llama"])[0])
    run_stage1(backbones, tmp_path / "s1")
    after = load_file(tmp_path / "s1" / "model.safetensors")
    assert changed_parts(before, after) == {"vision": False, "projector": True, "language": False}
    assert (tmp_path / "s1" / "loss.png").stat().st_size > 0


@pytest.fixture(scope="module")
def stage1_folder(backbones, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stage1")
    run_stage1(backbones, folder)
    return folder


def run_stage2(folder, output_dir, use_lora=False, max_samples=16, curve_every=None, curve_questions=300, **training):
    settings = COMMON | dict(max_steps=3, learning_rate=1e-2, bf16=False, gradient_checkpointing=False) | training
    args = SFTConfig(output_dir=str(output_dir), **settings)
    tuning = stage2.TuningArguments(projector_learning_rate=1e-2, use_lora=use_lora, lora_r=4, lora_alpha=8)
    data = stage2.DataArguments(max_samples=max_samples, curve_every=curve_every, curve_questions=curve_questions)
    return stage2.main(ModelArguments(model_name_or_path=str(folder)), data, tuning, args)


def test_stage2_trains_projector_and_lm_not_vision(stage1_folder, tmp_path):
    """Stage 2 changes projector and LM weights and leaves the vision tower bit-identical."""
    before = load_file(stage1_folder / "model.safetensors")
    trainer = run_stage2(stage1_folder, tmp_path / "s2", learning_rate=5e-3)
    after = load_file(tmp_path / "s2" / "model.safetensors")
    assert changed_parts(before, after) == {"vision": False, "projector": True, "language": True}

    # The optimizer holds exactly the trainable parameters, in groups per part and decay split, each part at its rate.
    optimizer = trainer.optimizer
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert in_optimizer == trainable
    assert set(map(id, optimizer.state)) <= trainable and len(optimizer.state) == len(trainable)
    assert sum(p.numel() for group in optimizer.param_groups for p in group["params"]) == sum(
        trainable_parameters(trainer.model).values()
    )
    rates = {group["name"]: group["initial_lr"] for group in optimizer.param_groups}  # before the schedule scaled them
    assert rates == {"language": 5e-3, "language.no_decay": 5e-3, "projector": 1e-2, "projector.no_decay": 1e-2}
    frozen = sum(p.numel() for p in trainer.model.model.vision_tower.parameters())
    assert frozen > 0 and trainable_parameters(trainer.model)["vision"] == 0


def test_stage2_with_lora_trains_adapters_and_projector_only(stage1_folder, tmp_path):
    """With LoRA only adapters and projector change, and the saved (merged) folder loads as a plain VLM."""
    before = load_file(stage1_folder / "model.safetensors")
    trainer = run_stage2(stage1_folder, tmp_path / "lora", use_lora=True)
    peft_model = trainer.model
    for name, parameter in peft_model.named_parameters():
        is_adapter = "lora_" in name
        assert parameter.requires_grad == (is_adapter or "multi_modal_projector" in name), name
    base = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in peft_model.state_dict().items()
        if "lora_" not in k
    }
    assert changed_parts(before, base) == {"vision": False, "projector": True, "language": False}
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in peft_model.named_parameters() if "lora_B" in n)

    loaded = VLMForConditionalGeneration.from_pretrained(tmp_path / "lora")
    merged = loaded.state_dict()
    assert changed_parts(before, merged)["language"]  # the adapters were merged into the LM
    assert not changed_parts(before, merged)["vision"]


def test_sft_trainer_overfits_a_tiny_repeated_batch(stage1_folder, tmp_path):
    """SFTTrainer on images + messages with the hf_vlm model and processor drives the loss down."""
    # One batch, 20 times.
    trainer = run_stage2(stage1_folder, tmp_path / "fit", max_samples=4, max_steps=20, learning_rate=1e-2)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 20 and sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses


def test_set_trainable_and_param_groups(model):
    """set_trainable counts per part; param_groups leaves frozen parts out and needs a rate per trainable part."""
    counts = set_trainable(model, vision=False, projector=True, language=False)
    assert counts["vision"] == counts["language"] == 0 < counts["projector"]
    decay = [name for name, _ in model.named_parameters() if "bias" not in name]
    assert [g["name"] for g in param_groups(model, {"projector": 1e-3}, 0.1, decay)] == [
        "projector",
        "projector.no_decay",
    ]
    set_trainable(model, vision=False, projector=True, language=True)
    with pytest.raises(ValueError, match="language"):
        param_groups(model, {"projector": 1e-3}, 0.1, decay)
    model.train()
    assert model.model.language_model.training and not model.model.vision_tower.training


OPTIMIZERS = {"adamw_torch": torch.optim.AdamW, "adafactor": Adafactor, "sgd": torch.optim.SGD}


@pytest.mark.parametrize("optim", OPTIMIZERS)
def test_optimizer_follows_the_training_arguments(model, tmp_path, optim):
    """The trainer's optimizer is --optim's class with its settings over groups per part (the projector at its own
    rate) and per decay split, the split being the stock Trainer's: no weight decay on biases and norms."""
    set_trainable(model, vision=False, projector=True, language=True)
    settings = dict(learning_rate=1e-3, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.9, adam_epsilon=1e-6)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", optim=optim, **settings)
    optimizer = VLMTrainer(model=model, args=args, projector_learning_rate=5e-3).create_optimizer()
    assert type(optimizer) is OPTIMIZERS[optim]

    names = {id(p): name for name, p in model.named_parameters()}
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert list(groups) == ["language", "language.no_decay", "projector", "projector.no_decay"]
    for name, group in groups.items():
        part, decays = name.split(".")[0], not name.endswith(".no_decay")
        assert group["lr"] == {"language": 1e-3, "projector": 5e-3}[part], name
        assert group["weight_decay"] == (0.1 if decays else 0.0), name
        assert group["params"] and {part_of(names[id(p)]) for p in group["params"]} == {part}, name
        if optim == "adamw_torch":
            assert group["betas"] == (0.8, 0.9) and group["eps"] == 1e-6
    no_decay = {names[id(p)] for name, group in groups.items() if name.endswith(".no_decay") for p in group["params"]}
    assert any(".bias" in n for n in no_decay) and any("norm" in n for n in no_decay)
    assert not any(
        ".bias" in names[id(p)] or "norm" in names[id(p)]
        for part in ("language", "projector")
        for p in groups[part]["params"]
    )

    stock = Trainer(model=model, args=args).create_optimizer()  # the Trainer's own split: [decay, no decay]
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(stock.param_groups[0]["params"]) == ids(groups["language"]["params"]) | ids(
        groups["projector"]["params"]
    )
    assert ids(stock.param_groups[1]["params"]) == ids(groups["language.no_decay"]["params"]) | ids(
        groups["projector.no_decay"]["params"]
    )


def test_optimizer_given_its_parameters_is_refused(model, tmp_path):
    """Parameters passed in `optimizer_cls_and_kwargs` (the old way to get per-part rates) are refused, not used."""
    set_trainable(model, vision=False, projector=True, language=False)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    given = (torch.optim.AdamW, {"params": list(model.parameters())})
    with pytest.raises(ValueError, match="brings its own parameters"):
        VLMTrainer(model=model, args=args, optimizer_cls_and_kwargs=given).create_optimizer()


def test_stage1_with_push_to_hub_pushes_the_saved_folder(backbones, hub, tmp_path):
    """--push_to_hub true uploads the folder the run saved (weights, config, processor, remote code, loss.png),
    and the repo loads with from_pretrained to the trained weights."""
    import hashlib

    from huggingface_hub import HfApi, hf_hub_download

    trainer = run_stage1(backbones, tmp_path / "s1", push_to_hub=True, hub_model_id="user/tiny")
    local = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "s1").iterdir() if p.is_file()}
    assert {"model.safetensors", "config.json", "processor_config.json", "loss.png"} <= local.keys()
    assert any(name.startswith("modeling") and name.endswith(".py") for name in local)  # the remote code
    pushed = {f.rfilename for f in HfApi().list_repo_tree("user/tiny")} - {".gitattributes"}
    assert pushed == local.keys()
    assert all(
        hashlib.sha256(Path(hf_hub_download("user/tiny", name)).read_bytes()).hexdigest() == local[name]
        for name in pushed
    )

    loaded = VLMForConditionalGeneration.from_pretrained("user/tiny")
    trained = trainer.model.state_dict()
    assert loaded.state_dict().keys() == trained.keys() and all(
        torch.equal(v, trained[k]) for k, v in loaded.state_dict().items()
    )
    assert VLMProcessor.from_pretrained("user/tiny").image_seq_length == loaded.config.image_seq_length


@pytest.mark.parametrize("recipe", sorted((SCRIPTS / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_parses_into_its_script_arguments(recipe):
    """Each YAML recipe names only fields its script's dataclasses have (bf16 switched off: no GPU here)."""
    import yaml
    from trl import TrlParser

    types = {
        "stage1": (ModelArguments, stage1.DataArguments, TrainingArguments),
        "stage2": (ModelArguments, stage2.DataArguments, stage2.TuningArguments, SFTConfig),
    }[recipe.name.split("_")[0]]
    entries = yaml.safe_load(recipe.read_text()) | {"bf16": False}
    parsed = TrlParser(types).parse_dict(entries)
    assert parsed[-1].output_dir == entries["output_dir"]


def test_vlm_sft_trainer_loss_and_metrics_equal_trls_fused_head(stage1_folder, tmp_path):
    """Off Triton, VLMSFTTrainer's labelled-positions loss, entropy and token accuracy equal TRL's fused head's
    to 1e-5."""
    from trl import SFTTrainer

    trainer = run_stage2(stage1_folder, tmp_path / "metrics", max_steps=1)
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    with torch.no_grad():
        ours = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(5))
        ours_metrics = {key: trainer._metrics["train"][key][-1] for key in ("entropy", "mean_token_accuracy")}
        trls = SFTTrainer.compute_loss(trainer, model, dict(batch), num_items_in_batch=torch.tensor(5))
        trls_metrics = {key: trainer._metrics["train"][key][-1] for key in ("entropy", "mean_token_accuracy")}
    torch.testing.assert_close(ours, trls, atol=1e-5, rtol=0)
    for key in ours_metrics:
        assert abs(ours_metrics[key] - trls_metrics[key]) < 1e-5, key
    assert any("mean_token_accuracy" in entry for entry in trainer.state.log_history)


def test_stage2_learning_curve_records_points(stage1_folder, tmp_path):
    """--curve_every evaluates with image and blind before, during and after training and writes curve.json/png."""
    import json

    run_stage2(stage1_folder, tmp_path / "curve", max_steps=4, curve_every=8, curve_questions=4)
    points = json.loads((tmp_path / "curve" / "curve" / "curve.json").read_text())
    assert [point["samples"] for point in points] == [0, 8, 16]
    assert set(points[0]["metrics"]) >= {"overall", "yes/no"} and "blind_accuracy" in points[-1]["metrics"]["overall"]
    assert (tmp_path / "curve" / "curve" / "curve.png").stat().st_size > 0


def test_a_parameter_of_no_part_is_an_error_not_the_language_rate():
    """A name the parts do not cover (FSDP1's flattened parameters) raises instead of taking the LM's rate."""
    from hf_vlm.training import part_of

    assert part_of("base_model.model.model.multi_modal_projector.linear_1.weight") == "projector"
    assert part_of("lm_head.weight") == "language"
    with pytest.raises(ValueError, match="belongs to no part"):
        part_of("_fsdp_wrapped_module._flat_param")
