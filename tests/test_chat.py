"""python -m hf_vlm.chat on a saved tiny model: answers, streams, keeps a conversation, says what is missing."""

import json
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import TextStreamer

from hf_vlm import VLMForConditionalGeneration, VLMProcessor, chat

# Runs `python -m hf_vlm.chat` with every write to stdout recorded, and a None where `generate` returns.
RECORDED = """
import json, runpy, sys
import transformers

events = []


class Recorder:
    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        events.append(text)
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


generate = transformers.GenerationMixin.generate


def marked(self, *args, **kwargs):
    output = generate(self, *args, **kwargs)
    events.append(None)
    return output


transformers.GenerationMixin.generate = marked
sys.stdout = Recorder(sys.stdout)
try:
    runpy.run_module("hf_vlm.chat", run_name="__main__", alter_sys=True)
finally:
    sys.stderr.write("\\nEVENTS " + json.dumps(events) + "\\n")
"""


@pytest.fixture(scope="module")
def saved(built, tmp_path_factory):
    """The tiny built model saved, with two 16-pixel PNGs: (folder, model and processor loaded back, images)."""
    folder = tmp_path_factory.mktemp("chat")
    built[0].save_pretrained(folder / "model")
    built[1].save_pretrained(folder / "model")
    images = {}
    for color in ("red", "blue"):
        Image.new("RGB", (16, 16), color).save(folder / f"{color}.png")
        images[color] = str(folder / f"{color}.png")
    model = VLMForConditionalGeneration.from_pretrained(folder / "model").eval()
    return str(folder / "model"), model, VLMProcessor.from_pretrained(folder / "model"), images


def greedy_answer(model, processor, messages, images, max_new_tokens) -> str:
    """What `generate` answers to the conversation, decoded without special tokens (as the streamer prints it)."""
    inputs = processor.apply_chat_template(
        messages,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"images": images} if images else {},
    )
    with torch.inference_mode():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id
        )
    return processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def run_chat(args, stdin="", script=None):
    command = [sys.executable, "-c", script] if script else [sys.executable, "-m", "hf_vlm.chat"]
    result = subprocess.run(
        command + [str(arg) for arg in args], input=stdin, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_chat_streams_the_answer_to_one_question_while_generate_runs(saved):
    """One question: stdout is generate's greedy answer, written in several pieces before generate returned."""
    folder, model, processor, images = saved
    question = "What is in the image?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    expected = greedy_answer(model, processor, messages, [Image.open(images["red"]).convert("RGB")], 12)
    assert expected.strip()

    args = ["--model", folder, "--image", images["red"], "--max_new_tokens", 12, question]
    result = run_chat(args, script=RECORDED)
    assert result.stdout == expected + "\n"
    events = json.loads(result.stderr.rsplit("EVENTS ", 1)[1])
    assert events.count(None) == 1
    pieces = [text for text in events[: events.index(None)] if text.strip()]
    # A single print of the finished answer would be one piece, and after generate returned.
    assert len(pieces) >= 2 and "".join(pieces).strip() == expected.strip(), pieces


def test_chat_conversation_from_stdin_adds_images_keeps_turns_and_resets(saved, tmp_path):
    """/image adds to the next question (a missing one is reported), answers see earlier turns, /reset forgets."""
    folder, model, processor, images = saved
    red, blue = (Image.open(images[color]).convert("RGB") for color in ("red", "blue"))
    first = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What?"}]}]
    answer_1 = greedy_answer(model, processor, first, [red, blue], 6)
    second = first + [
        {"role": "assistant", "content": [{"type": "text", "text": answer_1.strip()}]},
        {"role": "user", "content": [{"type": "text", "text": "And now?"}]},
    ]
    answer_2 = greedy_answer(model, processor, second, [red, blue], 6)
    answer_3 = greedy_answer(model, processor, [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], [], 6)
    assert answer_1 != answer_2  # the second question is asked after the first turn, so its answer differs

    missing = tmp_path / "missing.png"
    stdin = f"/image {images['blue']}\n/image {missing}\nWhat?\nAnd now?\n/reset\nHi\n/quit\nnever asked\n"
    result = run_chat(["--model", folder, "--image", images["red"], "--max_new_tokens", 6], stdin)
    # input() writes its "> " prompt for each of the seven lines read; /quit stops before the eighth.
    prompts = "> " * 3 + answer_1 + "\n" + "> " + answer_2 + "\n" + "> " * 2 + answer_3 + "\n" + "> "
    assert result.stdout == prompts
    assert f"error: image {missing}: no such file" in result.stderr


def test_chat_sampling_flags_reach_generate(saved, monkeypatch, capsys):
    """--do_sample, --temperature, --top_p and --max_new_tokens go to generate with a TextStreamer; greedy has none."""
    folder, _, _, images = saved
    calls = []
    generate = VLMForConditionalGeneration.generate

    def spy(self, **kwargs):
        calls.append(kwargs)
        return generate(self, **kwargs)

    monkeypatch.setattr(VLMForConditionalGeneration, "generate", spy)
    flags = ["--do_sample", "--temperature", "0.7", "--top_p", "0.9", "--seed", "3", "--max_new_tokens", "3"]
    chat.main(["--model", folder, "--image", images["red"], *flags, "Hi"])
    chat.main(["--model", folder, "--max_new_tokens", "2", "Hi"])
    sampled, greedy = calls
    assert isinstance(sampled["streamer"], TextStreamer) and isinstance(greedy["streamer"], TextStreamer)
    assert (sampled["do_sample"], sampled["temperature"], sampled["top_p"], sampled["max_new_tokens"]) == (
        True,
        0.7,
        0.9,
        3,
    )
    assert "pixel_values" in sampled and "pixel_values" not in greedy  # the second question has no image
    assert greedy["do_sample"] is False and greedy["max_new_tokens"] == 2
    assert "temperature" not in greedy and "top_p" not in greedy


def test_chat_errors_name_the_missing_image_or_model(saved, tmp_path):
    """A missing image or model folder ends chat with a message naming it, before anything is generated."""
    folder, _, _, images = saved
    with pytest.raises(SystemExit, match=re.escape(f"error: image {tmp_path / 'no.png'}: no such file")):
        chat.main(["--model", folder, "--image", str(tmp_path / "no.png"), "Hi"])
    with pytest.raises(SystemExit, match=re.escape(f"error: --model: no such folder: {tmp_path / 'none'}")):
        chat.main(["--model", str(tmp_path / "none"), "--image", images["red"], "Hi"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="error: .*empty"):
        chat.main(["--model", str(tmp_path / "empty"), "Hi"])
