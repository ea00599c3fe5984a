"""VLMModel and VLMForConditionalGeneration: any vision tower + a projector + any causal LM.

The layout follows transformers' Llava (`model.vision_tower`, `model.multi_modal_projector`,
`model.language_model`, `lm_head`), so state dict keys line up with Llava's and the machinery that
keys on these names works: `generate` runs `get_image_features` once before prefill and drops image
inputs afterwards, and TRL's `SFTTrainer` calls `model.base_model(...)` for its loss.

Images enter in one of three forms: `pixel_values` (the tower runs), `vision_features` (the tower's output,
e.g. from `hf_vlm.feature_cache` while the tower is frozen; only the projector runs), or
`mm_encoder_outputs` (image tokens `get_image_features` already made; `generate` passes these).
"""

import inspect

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
)
from transformers.modeling_utils import slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, torch_compilable_check
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .configuration_vlm import VLMConfig
from .projectors import PROJECTORS, ResamplerProjector

IMAGE_INPUTS = ("pixel_values", "vision_features", "mm_encoder_outputs")


def _check_one_image_input(*values):
    """Images come in one form at a time (`IMAGE_INPUTS`, in that order); two at once would leave one unused."""
    given = [name for name, value in zip(IMAGE_INPUTS, values, strict=True) if value is not None]
    if len(given) > 1:
        raise ValueError(f"Images came twice, as {' and '.join(given)}: pass one of {', '.join(IMAGE_INPUTS)}.")


def _check_is_tensor(name: str, value, shape: str, how: str):
    """Numpy arrays, lists and PIL images have no place here; say so before the tower fails on them obscurely."""
    if not isinstance(value, torch.Tensor):
        kind = (
            type(value).__qualname__
            if type(value).__module__ == "builtins"
            else f"{type(value).__module__}.{type(value).__qualname__}"
        )
        raise ValueError(f"{name} must be a torch.Tensor of shape {shape}, got a {kind}; {how}.")


def _check_values(name: str, images: torch.Tensor, remedy: str):
    """At least one image, every value finite: NaN or inf would otherwise become NaN logits and garbage text.

    One reduction over the values, a fraction of what the tower or projector that reads them costs; `generate`
    runs it once, in `get_image_features` before prefill.
    """
    if images.shape[0] == 0:
        raise ValueError(f"{name} holds 0 images (shape {tuple(images.shape)}); for text alone pass no image input.")
    # Reading the values back is data-dependent control flow, which `torch.compile(fullgraph=True)` cannot trace
    # (`_can_compile_fullgraph`). Compiled code skips the check: eager calls make it, and `generate` encodes the
    # images eagerly, once, before the decoding steps that it compiles.
    if torch.compiler.is_compiling():
        return
    finite = torch.isfinite(images)
    if not finite.all():
        bad = (~finite).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(
            f"{name} holds {int((~finite).sum())} NaN or infinite values, in images "
            f"{bad[:10]}{' ...' if len(bad) > 10 else ''} "
            f"of {images.shape[0]}; {remedy}."
        )


class VLMPreTrainedModel(PreTrainedModel):
    config: VLMConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # as Llava; the image checks that read values back skip themselves while compiling

    def save_pretrained(self, save_directory, *args, **kwargs):
        # `auto_map` records only the saved class's own auto class; both heads should load as remote code.
        if self._auto_class is not None:
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoModel": "modeling_vlm.VLMModel",
                "AutoModelForImageTextToText": "modeling_vlm.VLMForConditionalGeneration",
            }
        # A backbone's `_name_or_path` is what `build_vlm` loaded it from. A Hub id names a base model (the model
        # card lists it); a local folder means nothing elsewhere and would publish the user's paths, so it stays
        # out of config.json (the model in memory keeps it). Imported here, as this method alone needs them.
        import os

        from huggingface_hub.utils import HFValidationError, validate_repo_id

        def is_hub_id(name) -> bool:
            try:
                validate_repo_id(name)
            except HFValidationError:
                return False
            return bool(name) and not os.path.exists(name)

        names = [
            (backbone, backbone._name_or_path) for backbone in (self.config.vision_config, self.config.text_config)
        ]
        for backbone, name in names:
            if not is_hub_id(name):
                backbone._name_or_path = ""
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            for backbone, name in names:
                backbone._name_or_path = name

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ResamplerProjector):
            std = getattr(self.config.text_config, "initializer_range", 0.02)
            init.normal_(module.queries, std=std)
            init.normal_(module.key_positions, std=std)


class VLMModel(VLMPreTrainedModel):
    """Vision tower + projector + language model without its head; returns `last_hidden_state`."""

    def __init__(self, config: VLMConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = PROJECTORS[config.projector_type](config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def train(self, mode: bool = True):
        super().train(mode)
        # A frozen vision tower stays in eval mode: updating BatchNorm statistics or using dropout is training it.
        if not any(p.requires_grad for p in self.vision_tower.parameters()):
            self.vision_tower.eval()
        return self

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def _check_pixel_values(self, pixel_values: torch.Tensor):
        channels, size = getattr(self.config.vision_config, "num_channels", 3), self.config.image_size
        how = 'VLMProcessor (or its image processor) with return_tensors="pt" makes them from images'
        _check_is_tensor("pixel_values", pixel_values, f"(num_images, {channels}, {size}, {size})", how)
        if pixel_values.ndim != 4 or pixel_values.shape[1] != channels:
            raise ValueError(
                f"pixel_values must be (num_images, {channels}, height, width), got {tuple(pixel_values.shape)}."
            )
        if tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(
                f"pixel_values are {pixel_values.shape[-2]}x{pixel_values.shape[-1]} pixels, this model expects "
                f"{size}x{size} (config.image_size); VLMProcessor resizes images to that size."
            )
        if not pixel_values.is_floating_point():
            # Casting would feed raw 0-255 (or 0/1) values to a tower trained on normalised pixels: garbage, no error.
            raise ValueError(
                f"pixel_values are {pixel_values.dtype}; the model takes the image processor's normalised float "
                f"pixels, not raw ones: {how}."
            )
        _check_values("pixel_values", pixel_values, "check the images and the image processor's mean and std")

    def get_vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Run the vision tower: (num_images, channels, image_size, image_size) -> (num_images, N, C).

        N and C are what the projector reads: the selected hidden states (`vision_feature_layer`, a list
        concatenated on channels), a CNN map flattened row-major, without the `vision_num_prefix_tokens` CLS and
        register tokens when `drop_cls_token`. While the tower is frozen these never change for an image, so
        `hf_vlm.feature_cache` stores them.
        """
        return self._run_vision_tower(pixel_values)[0]

    def _run_vision_tower(self, pixel_values, output_hidden_states=None, output_attentions=None):
        """`get_vision_features`, plus the tower's own outputs (its hidden states only when asked for)."""
        self._check_pixel_values(pixel_values)
        layers = self.config.vision_feature_layer
        pixel_values = pixel_values.to(self.vision_tower.dtype)
        if output_hidden_states is None:  # the tower's config decides, as when it runs alone
            output_hidden_states = self.vision_tower.config.output_hidden_states
        options = {"output_hidden_states": bool(output_hidden_states) or layers is not None}
        if output_attentions is not None:
            options["output_attentions"] = output_attentions
        # A frozen tower (training stage 1 and 2) builds no autograd graph.
        track_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(track_grad):
            outputs = self.vision_tower(pixel_values, return_dict=True, **options)
        if layers is None:
            selected = [outputs.last_hidden_state]
        else:
            selected = [outputs.hidden_states[i] for i in (layers if isinstance(layers, list) else [layers])]
        if not output_hidden_states:
            outputs.hidden_states = None  # taken to select layers, not asked for
        # CNN maps (B, C, H, W) become (B, H*W, C) patch sequences, row-major like ViT patches.
        selected = [f.flatten(2).transpose(1, 2) if f.ndim == 4 else f for f in selected]
        if self.config.drop_cls_token:
            selected = [f[:, self.config.vision_num_prefix_tokens :] for f in selected]
        return torch.cat(selected, dim=-1), outputs  # (num_images, num_patches, vision_hidden * num_layers)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | BaseModelOutputWithPooling:
        """Encode images into image tokens, from pixels or from the tower's stored output.

        Args:
            pixel_values: (num_images, channels, image_size, image_size), all images of the batch in text order.
            vision_features: (num_images, N, C), what `get_vision_features` returns for those images.
            output_hidden_states, output_attentions: the vision tower's, as in Llava (defaults: its config's).
            return_dict: `False` gives the output's non-`None` fields as a tuple.

        Returns:
            `BaseModelOutputWithPooling` whose `last_hidden_state` is the (num_images, N, C) vision features, whose
            `pooler_output` is a list with one (image_seq_length, text hidden) tensor per image, and whose
            `hidden_states` and `attentions` are the tower's when asked for (`None` from `vision_features`).
        """
        if (pixel_values is None) == (vision_features is None):
            raise ValueError("get_image_features takes exactly one of pixel_values or vision_features.")
        tower = {}
        if vision_features is None:
            vision_features, outputs = self._run_vision_tower(
                pixel_values, kwargs.get("output_hidden_states"), kwargs.get("output_attentions")
            )
            tower = {"hidden_states": outputs.hidden_states, "attentions": getattr(outputs, "attentions", None)}
        else:
            self._check_vision_features(vision_features)
        weight = next(self.multi_modal_projector.parameters())
        # (num_images, image_seq_length, text hidden)
        image_tokens = self.multi_modal_projector(vision_features.to(weight.device, weight.dtype))
        return BaseModelOutputWithPooling(last_hidden_state=vision_features, pooler_output=list(image_tokens), **tower)

    def _check_vision_features(self, vision_features: torch.Tensor):
        patches, channels = self.config.vision_num_patches, self.config.vision_feature_size
        how = "they are what get_vision_features returns for the images (hf_vlm.feature_cache stores them)"
        _check_is_tensor("vision_features", vision_features, f"(num_images, {patches}, {channels})", how)
        if vision_features.ndim != 3 or tuple(vision_features.shape[1:]) != (patches, channels):
            raise ValueError(
                f"vision_features must be (num_images, {patches}, {channels}) for this model's tower, got "
                f"{tuple(vision_features.shape)}; they are what get_vision_features returns."
            )
        if not vision_features.is_floating_point():
            raise ValueError(f"vision_features are {vision_features.dtype}, not floating point; {how}.")
        _check_values(
            "vision_features", vision_features, "check the vision tower and the feature cache that made them"
        )

    def _merge_image_tokens(self, input_ids, inputs_embeds, image_features: list[torch.Tensor]) -> torch.Tensor:
        """Write image features into the positions of `image_token_id`, checking that the counts agree."""
        image_token_id = self.config.image_token_id
        if image_token_id is None:
            raise ValueError("config.image_token_id is not set, so images cannot be placed in the text.")
        if input_ids is not None:
            mask = input_ids == image_token_id
        else:
            image_embedding = self.get_input_embeddings()(torch.tensor(image_token_id, device=inputs_embeds.device))
            mask = (inputs_embeds == image_embedding).all(-1)
        features = torch.cat(image_features, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        num_tokens = mask.sum()
        # As Llava: a check in eager mode, a hint that dynamo can trace under `torch.compile` (an `if` on the count
        # would be data-dependent control flow).
        torch_compilable_check(
            num_tokens == features.shape[0],
            lambda: (
                f"Image features and image tokens do not match: the text has {int(num_tokens)} image tokens, the "
                f"images give {features.shape[0]} features ({len(image_features)} images x "
                f"{self.config.image_seq_length} tokens each). Each image placeholder must expand to image_seq_length "
                "image tokens, and truncation must not cut them."
            ),
        )
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1).to(inputs_embeds.device), features)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # as Llava: the old name still works, and warns
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        vision_features: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | MultimodalBaseModelOutputWithPast:
        """Images come as one of: `pixel_values` (every image of the batch in text order), `vision_features` (the
        tower's output for them, see `get_vision_features`), or `mm_encoder_outputs={"image": ...}` (what
        `get_image_features` returned; `generate` computes it once, before prefill). As in Llava, a
        `mm_encoder_outputs` beside another image input raises, and `return_dict=False` gives a tuple."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        _check_one_image_input(pixel_values, vision_features, mm_encoder_outputs)
        image_outputs = (mm_encoder_outputs or {}).get("image")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, T, D)

        if pixel_values is not None or vision_features is not None:
            # The tower's hidden states and attentions come back in `image_outputs` when asked for, as in Llava.
            options = {k: kwargs[k] for k in ("output_hidden_states", "output_attentions") if k in kwargs}
            image_outputs = self.get_image_features(pixel_values, vision_features, return_dict=True, **options)
        if image_outputs is not None:
            inputs_embeds = self._merge_image_tokens(input_ids, inputs_embeds, image_outputs.pooler_output)

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )
        return MultimodalBaseModelOutputWithPast(**outputs, image_outputs=image_outputs)


class VLMForConditionalGeneration(VLMPreTrainedModel, GenerationMixin):
    """`VLMModel` + `lm_head`: logits and a causal LM loss from `labels` (-100 ignored)."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # As Llava: under tensor parallelism the head is sharded as the LM shards the embedding it may be tied to.
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: VLMConfig):
        super().__init__(config)
        self.model = VLMModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module):
        self.lm_head = new_embeddings

    def get_vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_vision_features(pixel_values)

    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values=pixel_values, vision_features=vision_features, **kwargs)

    def _prepare_multimodal_encoder_kwargs_for_generation(self, model_kwargs: dict) -> dict:
        # Two image inputs raise here as in forward (transformers' own check covers pixels beside encoder outputs
        # only). Then: `generate` runs `get_image_features` before prefill only when it sees pixel inputs, and would
        # drop `vision_features` unused; route them the same way, so the projector runs once and beams expand alike.
        encoded = (model_kwargs.get("mm_encoder_outputs") or {}).get("image")
        _check_one_image_input(model_kwargs.get("pixel_values"), model_kwargs.get("vision_features"), encoded)
        vision_features = model_kwargs.pop("vision_features", None)
        if vision_features is not None:
            image_outputs = self.get_image_features(vision_features=vision_features, return_dict=True)
            model_kwargs.setdefault("mm_encoder_outputs", {})["image"] = image_outputs
        return super()._prepare_multimodal_encoder_kwargs_for_generation(model_kwargs)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        vision_features: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | MultimodalCausalLMOutputWithPast:
        """Logits, and with `labels` a causal LM loss (labels are shifted inside; -100 is ignored).

        With `labels`, only the positions whose next token carries a label go through `lm_head`: `logits` is then
        (num_labelled, vocab), those positions in row-major order, as `slice_logits_to_keep` returns them for a
        boolean mask, and the loss equals the full computation's. The head is `vocab x hidden` (a fifth of a 135M
        LM's arithmetic for a 49k vocabulary) and an answer is a few of a sample's tokens. Call without `labels`
        (or with a non-zero `logits_to_keep`) for (batch, seq_len', vocab) logits.
        """
        shift_labels = kwargs.pop("shift_labels", None)  # pre-shifted labels (sequence parallelism) are the head's
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            mm_encoder_outputs=mm_encoder_outputs,
            vision_features=vision_features,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (B, T, D)
        vocab_size = self.config.text_config.vocab_size
        loss = None
        if labels is not None and isinstance(logits_to_keep, int) and logits_to_keep == 0:
            # Position t predicts token t+1.
            if shift_labels is None:
                shift_labels = nn.functional.pad(labels[:, 1:], (0, 1), value=-100)  # (B, T)
            labelled = (shift_labels != -100).to(hidden_states.device)
            logits = self.lm_head(slice_logits_to_keep(hidden_states, labelled))  # (num_labelled, vocab)
            targets = shift_labels.to(hidden_states.device)[labelled]
            loss = self.loss_function(
                logits=logits, labels=None, shift_labels=targets, vocab_size=vocab_size, **kwargs
            )
        else:
            # Generation asks for the last position's logits only (logits_to_keep=1).
            logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))  # (B, T', vocab)
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)

        return MultimodalCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
        )

    # `generate` asks for `inspect.signature(self.forward)` at every decode step of a model registered for remote code
    # (its check for the old `cache_position` argument), and ours is registered so that checkpoints load without
    # hf_vlm. inspect otherwise rebuilds it through the two decorators each time; precomputed, it is the same
    # signature at a fifth of the cost (0.045 -> 0.009 ms here). That is a few % of a tiny model's decode step:
    # generate's throughput against Llava on benchmarks/generation.py's --quick backbones, one thread, medians of 40
    # paired repetitions, was 0.94x and 0.96x without it and 1.00x and 0.99x with it, in two runs.
    forward.__signature__ = inspect.signature(forward)


__all__ = ["VLMPreTrainedModel", "VLMModel", "VLMForConditionalGeneration"]
