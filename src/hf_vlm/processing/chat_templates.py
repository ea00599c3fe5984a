"""Chat templates for VLMs, kept as `.jinja` files beside this module (package data).

An LM's own template usually renders plain-string content only and has no `{% generation %}`
markers, and neither can be derived from an arbitrary template. These templates render
`{"type": "image"}` blocks as the image placeholder and wrap each assistant answer (with its end
token, so the model learns to stop) in `{% generation %}`, which `return_assistant_tokens_mask=True`
and TRL's `assistant_only_loss` read.
"""

from importlib.resources import files

# name -> template text; `save_pretrained` writes it to the checkpoint's chat_template.jinja.
CHAT_TEMPLATES = {
    name: files(__package__).joinpath(f"{name}.jinja").read_text(encoding="utf-8") for name in ("chatml",)
}
# The token that closes an assistant turn in each template: generation must stop there.
END_OF_TURN = {"chatml": "<|im_end|>"}
