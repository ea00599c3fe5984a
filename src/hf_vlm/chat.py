"""Talk to a saved hf_vlm model about images in the terminal: one question, or a conversation.

    python -m hf_vlm.chat --model runs/stage2 --image cat.png "What is in the image?"
    python -m hf_vlm.chat --model runs/stage2 --image cat.png --image dog.png  # a conversation; /quit ends it
    python -m hf_vlm.chat --model user/tiny-vlm --image cat.png --do_sample --temperature 0.7 "Describe it."

With a question it prints the answer and exits; without one it reads questions from stdin, one per line, and keeps
the conversation: `/image PATH` adds an image to the next question, `/reset` starts over without images, `/quit`
(or end of input) ends. Images go into the first question after they are added, in order. Each answer is printed
as it is generated (transformers' `TextStreamer`, a word at a time); the prompt is the processor's chat template over
the whole conversation, and the answer comes from `model.generate` (greedy unless `--do_sample`).
"""

import argparse
import sys

import torch
from transformers import TextStreamer, set_seed

from .build import loading_from
from .data.images import load_image
from .data.schema import BadSampleError
from .modeling import VLMForConditionalGeneration
from .processing import VLMProcessor

HELP = "Commands: /image PATH adds an image to your next question, /reset starts over, /quit ends."


def read_image(path: str):
    """The image at `path` as RGB; a `ValueError` says why it cannot be read (missing, corrupt, ...)."""
    try:
        return load_image(path, sample_id=path)
    except BadSampleError as error:
        raise ValueError(f"image {path}: {error.detail}") from None


class Chat:
    """One conversation with a model: the turns so far and their images; `ask` streams an answer and keeps it."""

    def __init__(self, model, processor, **generation):
        self.model, self.processor, self.generation = model, processor, generation
        self.reset()

    def reset(self) -> None:
        """Forget every turn and image."""
        self.messages, self.images, self.pending = [], [], 0

    def add_image(self, image) -> None:
        """Put a PIL image into the next question."""
        self.images.append(image)
        self.pending += 1

    def ask(self, question: str) -> str:
        """Append the question (with the images added since the last one), print the answer as it comes, return it."""
        content = [{"type": "image"}] * self.pending + [{"type": "text", "text": question}]
        self.messages.append({"role": "user", "content": content})
        self.pending = 0
        inputs = self.processor.apply_chat_template(
            self.messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"images": self.images} if self.images else {},
        ).to(self.model.device)
        tokenizer = self.processor.tokenizer
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        with torch.inference_mode():
            output = self.model.generate(
                **inputs, streamer=streamer, pad_token_id=tokenizer.pad_token_id, **self.generation
            )
        answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return answer


def interact(chat: Chat) -> None:
    """Read questions and commands from stdin until `/quit` or the end of input."""
    print(HELP, file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return
        command, _, argument = line.partition(" ")
        if command == "/quit":
            return
        if command == "/reset":
            chat.reset()
            print("(conversation cleared)", file=sys.stderr)
        elif command == "/image":
            try:
                chat.add_image(read_image(argument.strip()))
                print(f"(image {argument.strip()} goes into the next question)", file=sys.stderr)
            except ValueError as error:  # a wrong path should not end the conversation
                print(f"error: {error}", file=sys.stderr)
        elif command.startswith("/"):
            print(HELP, file=sys.stderr)
        elif line:
            chat.ask(line)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hf_vlm.chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="A saved hf_vlm model: a folder or a Hub id.")
    parser.add_argument("--image", action="append", default=[], help="An image for the first question (repeatable).")
    parser.add_argument("question", nargs="?", help="Answer this and exit; without it, start a conversation.")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="Longest answer, in tokens.")
    parser.add_argument("--do_sample", action="store_true", help="Sample instead of greedy decoding.")
    parser.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (with --do_sample).")
    parser.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling mass (with --do_sample).")
    parser.add_argument("--seed", type=int, default=None, help="Seed, for sampling that repeats.")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    generation = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    if args.do_sample:
        generation |= {"temperature": args.temperature, "top_p": args.top_p}
    try:
        images = [read_image(path) for path in args.image]  # before the model, so that a typo fails at once
        with loading_from(args.model, "--model"):
            model = VLMForConditionalGeneration.from_pretrained(args.model, dtype="auto")
            processor = VLMProcessor.from_pretrained(args.model)
    except (ValueError, OSError) as error:  # OSError: no such folder, or one without a model, or not on the Hub
        sys.exit(f"error: {error}")
    chat = Chat(model.to("cuda" if torch.cuda.is_available() else "cpu").eval(), processor, **generation)
    for image in images:
        chat.add_image(image)
    if args.seed is not None:
        set_seed(args.seed)
    if args.question is not None:
        chat.ask(args.question)
    else:
        interact(chat)


if __name__ == "__main__":
    main()
