"""The easy_vqa_hf_vlm task's functions: image and question in, hf_vlm's answer cut and VQA accuracy out.

Scoring reuses hf_vlm's own `postprocess_answer` (first line, trailing punctuation) and the two functions of its
`vqa_accuracy` metric script (official VQA normalisation, then the accuracy formula), so a sample scores here exactly
as `hf_vlm.evaluation.score_samples` scores it. The functions are called directly, not through `evaluate.load`: one
loaded `evaluate` module is not safe to call from lmms-eval's parallel post-processing threads.
"""

from hf_vlm.evaluation import postprocess_answer
from hf_vlm.metrics.vqa_accuracy.vqa_accuracy import normalize_answer, question_accuracy


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    # The question verbatim, as hf_vlm's evaluation asks it; the model's chat template adds the rest.
    return doc["question"]


def process_results(doc, results):
    prediction = postprocess_answer(results[0])
    score = question_accuracy(normalize_answer(prediction), [normalize_answer(answer) for answer in doc["answers"]])
    return {"vqa_accuracy": score}
