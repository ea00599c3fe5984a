"""VLMModel and VLMForConditionalGeneration: any vision tower + a projector + any causal LM.

The layout follows transformers' Llava (`model.vision_tower`, `model.multi_modal_projector`,
`model.language_model`, `lm_head`), so state dict keys line up with Llava's and the machinery that
keys on these names works: `generate` runs `get_image_features` once before prefill and drops image
inputs afterwards, and TRL's `SFTTrainer` calls `model.base_model(...)` for its loss.
"""

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast

from .configuration_vlm import VLMConfig
from .projectors import PROJECTORS, ResamplerProjector


class VLMPreTrainedModel(PreTrainedModel):
    config: VLMConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def save_pretrained(self, save_directory, *args, **kwargs):
        # `auto_map` records only the saved class's own auto class; both heads should load as remote code.
        if self._auto_class is not None:
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoModel": "modeling_vlm.VLMModel",
                "AutoModelForImageTextToText": "modeling_vlm.VLMForConditionalGeneration",
            }
        return super().save_pretrained(save_directory, *args, **kwargs)

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
        expected_channels = getattr(self.config.vision_config, "num_channels", 3)
        if pixel_values.ndim != 4 or pixel_values.shape[1] != expected_channels:
            raise ValueError(
                f"pixel_values must be (num_images, {expected_channels}, height, width), got {tuple(pixel_values.shape)}."
            )
        size = self.config.image_size
        if tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(
                f"pixel_values are {pixel_values.shape[-2]}x{pixel_values.shape[-1]} pixels, this model expects "
                f"{size}x{size} (config.image_size); VLMProcessor resizes images to that size."
            )

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """Encode images into image tokens.

        Args:
            pixel_values: (num_images, channels, image_size, image_size), all images of the batch in text order.

        Returns:
            `BaseModelOutputWithPooling` whose `pooler_output` is a list with one (image_seq_length, text hidden)
            tensor per image.
        """
        self._check_pixel_values(pixel_values)
        layers = self.config.vision_feature_layer
        pixel_values = pixel_values.to(self.vision_tower.dtype)
        # A frozen tower (training stage 1 and 2) builds no autograd graph.
        track_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(track_grad):
            outputs = self.vision_tower(pixel_values, output_hidden_states=layers is not None, return_dict=True)
        if layers is None:
            selected = [outputs.last_hidden_state]
        else:
            selected = [outputs.hidden_states[i] for i in (layers if isinstance(layers, list) else [layers])]
        # CNN maps (B, C, H, W) become (B, H*W, C) patch sequences, row-major like ViT patches.
        selected = [f.flatten(2).transpose(1, 2) if f.ndim == 4 else f for f in selected]
        if self.config.drop_cls_token:
            selected = [f[:, 1:] for f in selected]
        features = torch.cat(selected, dim=-1)  # (num_images, num_patches, vision_hidden * num_layers)
        image_tokens = self.multi_modal_projector(features)  # (num_images, image_seq_length, text hidden)
        return BaseModelOutputWithPooling(last_hidden_state=features, pooler_output=list(image_tokens))

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
        num_tokens = int(mask.sum())
        if num_tokens != features.shape[0]:
            raise ValueError(
                f"Image features and image tokens do not match: the text has {num_tokens} image tokens, the images "
                f"give {features.shape[0]} features ({len(image_features)} images x {self.config.image_seq_length} "
                "tokens each). Each image placeholder must expand to image_seq_length image tokens, and truncation "
                "must not cut them."
            )
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1).to(inputs_embeds.device), features)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """`pixel_values` holds every image of the batch in text order; `mm_encoder_outputs={"image": ...}` passes
        features that `get_image_features` already computed (`generate` does this once, before prefill)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, T, D)

        image_outputs = (mm_encoder_outputs or {}).get("image")
        if image_outputs is None and pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values)
        if image_outputs is not None:
            inputs_embeds = self._merge_image_tokens(input_ids, inputs_embeds, image_outputs.pooler_output)

        return self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )


class VLMForConditionalGeneration(VLMPreTrainedModel, GenerationMixin):
    """`VLMModel` + `lm_head`: logits and a causal LM loss from `labels` (-100 ignored)."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: VLMConfig):
        super().__init__(config)
        self.model = VLMModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module):
        self.lm_head = new_embeddings

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, **kwargs)

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
        mm_encoder_outputs: dict | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (B, T, D)
        # Generation asks for the last position's logits only.
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])  # (B, T', vocab)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = ["VLMPreTrainedModel", "VLMModel", "VLMForConditionalGeneration"]
