"""Chat templates for VLMs.

An LM's own template usually renders plain-string content only and has no `{% generation %}`
markers, and neither can be derived from an arbitrary template. These templates render
`{"type": "image"}` blocks as the image placeholder and wrap each assistant answer (with its end
token, so the model learns to stop) in `{% generation %}`, which `return_assistant_tokens_mask=True`
and TRL's `assistant_only_loss` read.
"""

# ChatML, as SmolLM2 and Qwen2 use it: <|im_start|>role\n...<|im_end|>\n. No default system prompt.
CHATML = (
    "{%- for message in messages -%}"
    r"{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}"
    "{%- set text = message['content'] -%}"
    "{%- else -%}"
    "{%- set text = namespace(value='') -%}"
    "{%- for block in message['content'] -%}"
    "{%- if block['type'] == 'image' -%}{%- set text.value = text.value + '<image>' -%}"
    "{%- elif block['type'] == 'text' -%}{%- set text.value = text.value + block['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set text = text.value -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- text + '<|im_end|>' -}}{% endgeneration %}"
    "{%- else -%}"
    "{{- text + '<|im_end|>' -}}"
    "{%- endif -%}"
    r"{{- '\n' -}}"
    "{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

CHAT_TEMPLATES = {"chatml": CHATML}
# The token that closes an assistant turn in each template: generation must stop there.
END_OF_TURN = {"chatml": "<|im_end|>"}
