from importlib.resources import files

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from hf_vlm.processing import CHAT_TEMPLATES, END_OF_TURN

IMAGE_PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
DIALOGUE = [
    {"role": "system", "content": "Be brief.\n"},
    {"role": "user", "content": [{"type": "text", "text": "Two: "}, {"type": "image"}, {"type": "image"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "  Same.\n"}]},
    {"role": "user", "content": "And now?"},
    {"role": "assistant", "content": "no"},
]
# Blocks of other types render as nothing; an assistant turn without text still gets its end token.
ODD_BLOCKS = [
    {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": ""}]},
    {"role": "assistant", "content": []},
]

# Rendered with the template as it was, a Python string built with `+` (commit 35252d0): the .jinja file must not
# change one byte of what the model sees, nor the character spans `{% generation %}` marks for the assistant mask.
DIALOGUE_TEXT = (
    "<|im_start|>system\nBe brief.\n<|im_end|>\n<|im_start|>user\nTwo: <image><image><|im_end|>\n"
    "<|im_start|>assistant\n  Same.\n<|im_end|>\n<|im_start|>user\nAnd now?<|im_end|>\n"
    "<|im_start|>assistant\nno<|im_end|>\n"
)
RENDERINGS = [
    (IMAGE_PROMPT, False, "<|im_start|>user\n<image>What is this?<|im_end|>\n", []),
    (IMAGE_PROMPT, True, "<|im_start|>user\n<image>What is this?<|im_end|>\n<|im_start|>assistant\n", []),
    (DIALOGUE, False, DIALOGUE_TEXT, [(109, 127), (186, 198)]),  # "  Same.\n<|im_end|>" and "no<|im_end|>"
    (DIALOGUE, True, DIALOGUE_TEXT + "<|im_start|>assistant\n", [(109, 127), (186, 198)]),
    (ODD_BLOCKS, False, "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n", [(50, 60)]),
    ([], True, "<|im_start|>assistant\n", []),
]


@pytest.mark.parametrize(("messages", "add_generation_prompt", "text", "spans"), RENDERINGS)
def test_chatml_file_renders_as_the_old_string_did(messages, add_generation_prompt, text, spans):
    """chatml.jinja renders text and assistant spans byte for byte as the former Python-string template."""
    rendered, generation = render_jinja_template(
        [messages],
        chat_template=CHAT_TEMPLATES["chatml"],
        add_generation_prompt=add_generation_prompt,
        return_assistant_tokens_mask=True,
    )
    assert rendered == [text] and generation == [spans]
    assert all(text[start:end].endswith(END_OF_TURN["chatml"]) for start, end in spans)


def test_templates_come_from_package_data(built, tmp_path):
    """CHAT_TEMPLATES holds the .jinja files' text, which build_vlm's processor carries and saves unchanged."""
    _, processor = built
    assert CHAT_TEMPLATES == {
        "chatml": files("hf_vlm.processing").joinpath("chatml.jinja").read_text(encoding="utf-8")
    }
    assert processor.chat_template == CHAT_TEMPLATES["chatml"]
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text(encoding="utf-8") == CHAT_TEMPLATES["chatml"]
