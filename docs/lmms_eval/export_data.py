"""Write the fixed easy-VQA test subset that hf_vlm's evaluation uses as a `save_to_disk` folder lmms-eval can read.

    python docs/lmms_eval/export_data.py --limit 50 --output runs/lmms_eval/easy_vqa_test

The rows are `hf_vlm.evaluation.easy_vqa_test_questions(limit)` (same seed, same order), flattened to the columns
the task reads: `id`, `image`, `question`, `answers`, `question_type`. A DatasetDict with one split, "test", as
lmms-eval's `load_from_disk` path expects.
"""

import argparse

from datasets import DatasetDict

from hf_vlm.evaluation import easy_vqa_test_questions


def export(limit: int, output: str, seed: int = 0) -> DatasetDict:
    """Save the first `limit` questions of the shuffled test split to `output`; returns the saved DatasetDict."""
    questions = easy_vqa_test_questions(limit, seed)

    def flatten(row):
        user = row["messages"][0]
        text = " ".join(block["text"] for block in user["content"] if block["type"] == "text")
        return {"image": row["images"][0], "question": text}

    flat = questions.map(flatten, remove_columns=["images", "messages", "answer"])
    dataset = DatasetDict({"test": flat.select_columns(["id", "image", "question", "answers", "question_type"])})
    dataset.save_to_disk(output)
    return dataset


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="runs/lmms_eval/easy_vqa_test")
    args = parser.parse_args()
    print(export(args.limit, args.output, args.seed))
