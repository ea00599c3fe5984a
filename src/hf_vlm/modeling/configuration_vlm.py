"""VLMConfig: a vision encoder config, a causal LM config, and the few fields that join them."""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .projectors import PROJECTORS, ProjectorType


def default_num_prefix_tokens(vision_config: PreTrainedConfig) -> int:
    """Leading non-patch tokens of the towers whose layout is known: a CLS token, then any register tokens.

    The default of `VLMConfig.vision_num_prefix_tokens`; a tower not listed here (0) that emits such tokens sets
    that field.
    """
    if vision_config.model_type in ("clip_vision_model", "vit", "dinov2", "dinov2_with_registers"):
        return 1 + getattr(vision_config, "num_register_tokens", 0)
    return 0


@strict
class VLMConfig(PreTrainedConfig):
    r"""
    Configuration of a [`VLMForConditionalGeneration`]: image -> vision tower -> projector -> image tokens in
    the language model's embedding space -> language model -> text.

    Args:
        vision_config (`dict` or `PreTrainedConfig`): any vision encoder that `AutoModel` builds, e.g.
            `siglip_vision_model`, `clip_vision_model`, or `timm_wrapper` for a timm CNN.
        text_config (`dict` or `PreTrainedConfig`): any causal LM that `AutoModel` builds, e.g. `llama`, `qwen2`.
        projector_type (`str`): one of `PROJECTORS`: `linear`, `mlp`, `pixel_shuffle`, `c_abstractor`, `resampler`.
        image_token_id (`int`): the token id whose positions receive the image features; an id of the text
            config's vocabulary (`0 <= image_token_id < text_config.vocab_size`).
        vision_feature_layer (`int`, `list[int]` or `None`): which hidden states of the vision tower feed the
            projector; a list is concatenated on channels. `None` takes the tower's `last_hidden_state` (for a
            timm CNN, its final feature map).
        vision_num_prefix_tokens (`int`, *optional*): how many non-patch tokens (CLS, register tokens) lead the
            tower's sequence. Defaults to `default_num_prefix_tokens`: 1 for CLIP, ViT and DINOv2, 1 + the register
            count for `dinov2_with_registers`, 0 otherwise (SigLIP, timm CNNs).
        drop_cls_token (`bool`, *optional*): drop those `vision_num_prefix_tokens` leading tokens, so that only
            patches reach the projector (the name predates register tokens; configs saved before keep working).
            Defaults to `True` when the tower emits any.
        pixel_shuffle_factor (`int`): r for `pixel_shuffle`; r=2 gives 4x fewer image tokens.
        pixel_shuffle_layernorm (`bool`): whether `pixel_shuffle` normalises the shuffled features (InternVL's
            LayerNorm) before its linear map.
        projector_num_tokens (`int`): M, the number of tokens `c_abstractor` (a square) and `resampler` emit.
        image_size (`int`, *optional*): input side in pixels; read from the vision config when it has one.
        vision_grid_size (`int`, *optional*): side of the patch grid the tower emits; `image_size // patch_size`
            when the vision config has a patch size.
        vision_hidden_size (`int`, *optional*): channels of one selected feature map; the vision config's
            `hidden_size` when it has one. `timm_wrapper` configs carry none of these three, so they must be
            given (`hf_vlm.build_vlm` measures them with one dummy forward).
        image_seq_length (`int`, *optional*): image tokens per image. Derived from the above; a given value must
            agree with the derived one.

    Example:

    ```python
    >>> from transformers import LlamaConfig, SiglipVisionConfig
    >>> from hf_vlm import VLMConfig
    >>> config = VLMConfig(vision_config=SiglipVisionConfig(image_size=224, patch_size=16),
    ...                    text_config=LlamaConfig(vocab_size=1000), projector_type="pixel_shuffle",
    ...                    image_token_id=999)
    >>> config.image_seq_length  # (224 / 16 / 2) ** 2
    49
    ```
    """

    model_type = "hf_vlm"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projector_type: ProjectorType = "mlp"
    image_token_id: int | None = None
    vision_feature_layer: int | list[int] | None = None
    vision_num_prefix_tokens: int | None = None
    drop_cls_token: bool | None = None
    pixel_shuffle_factor: int = 2
    pixel_shuffle_layernorm: bool = True
    projector_num_tokens: int = 64
    image_size: int | None = None
    vision_grid_size: int | None = None
    vision_hidden_size: int | None = None
    image_seq_length: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # The tie flag lives in the text config of most LMs; lift it so `PreTrainedModel` ties lm_head.
        self.tie_word_embeddings = self.tie_word_embeddings or bool(self.text_config.tie_word_embeddings)

        vision = self.vision_config
        if self.vision_num_prefix_tokens is None:
            self.vision_num_prefix_tokens = default_num_prefix_tokens(vision)
        if self.drop_cls_token is None:
            self.drop_cls_token = self.vision_num_prefix_tokens > 0
        if self.image_size is None:
            self.image_size = getattr(vision, "image_size", None)
        if self.vision_grid_size is None and self.image_size and getattr(vision, "patch_size", None):
            self.vision_grid_size = self.image_size // vision.patch_size
        if self.vision_hidden_size is None:
            self.vision_hidden_size = getattr(vision, "hidden_size", None)
        missing = [
            name for name in ("image_size", "vision_grid_size", "vision_hidden_size") if getattr(self, name) is None
        ]
        if missing:
            raise ValueError(
                f"The {vision.model_type!r} vision config does not say {', '.join(missing)}: pass them to VLMConfig "
                "(hf_vlm.build_vlm measures them from the vision model)."
            )

        num_patches = self.vision_num_patches
        seq_length = PROJECTORS[self.projector_type].num_tokens(self, num_patches)
        if self.image_seq_length is not None and self.image_seq_length != seq_length:
            raise ValueError(
                f"image_seq_length={self.image_seq_length} disagrees with the {seq_length} image tokens that the "
                f"{self.projector_type!r} projector makes from {num_patches} patches; leave it unset to derive it."
            )
        self.image_seq_length = seq_length

    @property
    def vision_num_patches(self) -> int:
        """N, the tokens per image that reach the projector: the patch grid, plus the prefix tokens when kept.

        The one place this count is made: the projectors, the feature checks and `image_seq_length` read it.
        """
        return self.vision_grid_size**2 + (0 if self.drop_cls_token else self.vision_num_prefix_tokens)

    @property
    def vision_feature_size(self) -> int:
        """C, the channels per patch that reach the projector (selected layers are concatenated)."""
        layers = self.vision_feature_layer
        return self.vision_hidden_size * (len(layers) if isinstance(layers, list) else 1)

    def validate_architecture(self):
        """Part of `@strict` validation: options that the derived fields do not already check."""
        if self.vision_num_prefix_tokens < 0:
            raise ValueError(f"vision_num_prefix_tokens={self.vision_num_prefix_tokens} must be 0 or more.")
        if self.drop_cls_token and not self.vision_num_prefix_tokens:
            raise ValueError(
                f"drop_cls_token=True, but {self.vision_config.model_type!r} emits no CLS or register tokens "
                "(vision_num_prefix_tokens=0); set vision_num_prefix_tokens if it does."
            )
        if self.pixel_shuffle_factor < 1 or self.projector_num_tokens < 1:
            raise ValueError("pixel_shuffle_factor and projector_num_tokens must be positive.")
        # No tokenizer of this vocabulary emits an id outside it, so every image would fail later, far from the
        # cause (a token-count mismatch, an index error in the inputs_embeds path). transformers' own token-id
        # check only warns, and reads the text config's ids, not this one.
        vocab_size = getattr(self.text_config, "vocab_size", None)
        if self.image_token_id is not None and vocab_size is not None and not 0 <= self.image_token_id < vocab_size:
            raise ValueError(
                f"image_token_id={self.image_token_id} is outside the text model's vocabulary of {vocab_size} tokens "
                f"(ids 0 to {vocab_size - 1}); add an image token to the tokenizer and grow the embeddings "
                "(hf_vlm.build_vlm does both)."
            )


__all__ = ["VLMConfig"]
