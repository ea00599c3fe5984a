"""VQA accuracy (VQAv2) as an `evaluate` metric script; plain Python does the scoring.

Load it with `evaluate.load(hf_vlm.metrics.path("vqa_accuracy"))`. The rules follow the official
VQA evaluation (https://visualqa.org/evaluation.html), re-implemented here from its description;
the differences are listed in `_DESCRIPTION`.
"""

import re

import datasets
import evaluate

_DESCRIPTION = """\
VQA accuracy, the metric of the VQA and VQAv2 benchmarks, as a fraction in [0, 1] (multiply by 100
for the percentages papers report).

Every answer, predicted and reference, is first normalised the way the official evaluation does it:
- lower-case; newlines and tabs become spaces;
- punctuation ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! is deleted when it touches a space or when
  the answer contains a comma between two digits ("1,000" -> "1000"), and otherwise becomes a
  space ("yes/no" -> "yes no", "t-shirt" -> "t shirt");
- a period is deleted unless a digit follows it, so "circle." -> "circle" but "2.5" stays;
- the words none, zero, one, ..., ten become 0, 0, 1, ..., 10;
- the articles a, an, the are dropped;
- contractions written without an apostrophe get it back ("dont" -> "don't"). Only spellings that
  are not everyday English words are mapped (aint arent cant couldnt couldve didnt doesnt dont
  hadnt hasnt havent hes im isnt itll ive mightnt mustnt shes shouldnt shouldve thats theres
  theyre theyve wasnt werent whats whos wont wouldnt wouldve yall youll youre youve); "its",
  "well", "were" and the like are left alone.

Score of one question with n references, k of which equal the normalised prediction:
- n = 1: exact match, 1.0 or 0.0.
- n >= 2: leave each reference out in turn and average min(matches among the other n - 1 / t, 1)
  over the n subsets, with t = min(3, n - 1). For VQAv2's ten answers t = 3 and this is the
  official formula, (k * min((k - 1) / 3, 1) + (10 - k) * min(k / 3, 1)) / 10: one matching
  annotator gives 0.3, two 0.6, three 0.9, four or more 1.0. For 2 to 4 references t shrinks so
  that an answer every annotator gave still scores 1.0 (with t = 3 and two unanimous references it
  would get 1/3). Datasets that duplicate their answers to reach ten (OK-VQA repeats each of its
  five) should be duplicated by the caller before scoring.
The metric is the mean over questions.

Differences from the official script: it normalises only when the ten references disagree, this
metric always normalises (so "Two" matches "2" against a single reference); its contraction list is
longer; it takes no answer-type breakdown (score subsets separately for that).
"""

_CITATION = """\
@inproceedings{antol2015vqa,
  title     = {{VQA}: Visual Question Answering},
  author    = {Antol, Stanislaw and Agrawal, Aishwarya and Lu, Jiasen and Mitchell, Margaret and
               Batra, Dhruv and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle = {International Conference on Computer Vision (ICCV)},
  year      = {2015}
}
@inproceedings{goyal2017making,
  title     = {Making the {V} in {VQA} Matter: Elevating the Role of Image Understanding in Visual
               Question Answering},
  author    = {Goyal, Yash and Khot, Tejas and Summers-Stay, Douglas and Batra, Dhruv and
               Parikh, Devi},
  booktitle = {Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2017}
}
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list[str]`): one predicted answer per question.
    references (`list[list[str]]`): the reference answers of each question, one or more
        (VQAv2 has ten). Repeated answers count once per annotator who gave them.
Returns:
    vqa_accuracy (`float`): mean accuracy over the questions, a fraction in [0, 1].
Examples:
    >>> vqa = evaluate.load(hf_vlm.metrics.path("vqa_accuracy"))
    >>> vqa.compute(predictions=["Two", "yes"], references=[["2"], ["no"]])
    {'vqa_accuracy': 0.5}
"""

_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'  # the official list, one character each
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldnt": "couldn't",
    "couldve": "could've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hes": "he's",
    "im": "i'm",
    "isnt": "isn't",
    "itll": "it'll",
    "ive": "i've",
    "mightnt": "mightn't",
    "mustnt": "mustn't",
    "shes": "she's",
    "shouldnt": "shouldn't",
    "shouldve": "should've",
    "thats": "that's",
    "theres": "there's",
    "theyre": "they're",
    "theyve": "they've",
    "wasnt": "wasn't",
    "werent": "weren't",
    "whats": "what's",
    "whos": "who's",
    "wont": "won't",
    "wouldnt": "wouldn't",
    "wouldve": "would've",
    "yall": "y'all",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}


def normalize_answer(answer: str) -> str:
    """Normalise one answer as the official VQA evaluation does (see `_DESCRIPTION`)."""
    text = answer.lower().replace("\n", " ").replace("\t", " ").strip()
    original = text  # as the official rule does, test each mark against the answer as given
    delete_all = _DIGIT_COMMA_DIGIT.search(original) is not None
    for mark in _PUNCTUATION:
        touches_space = mark + " " in original or " " + mark in original
        text = text.replace(mark, "" if delete_all or touches_space else " ")
    text = _PERIOD_NOT_BEFORE_DIGIT.sub("", text)
    words = [_NUMBERS.get(word, word) for word in text.split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def question_accuracy(prediction: str, references: list[str]) -> float:
    """VQA accuracy of one (already normalised) prediction against its (normalised) references."""
    n = len(references)
    if n == 1:
        return float(prediction == references[0])
    threshold = min(3, n - 1)
    matches = sum(reference == prediction for reference in references)
    total = 0.0
    for left_out in references:
        matches_in_others = matches - (left_out == prediction)
        total += min(matches_in_others / threshold, 1.0)
    return total / n


class VqaAccuracy(evaluate.Metric):
    """VQAv2 accuracy (Antol et al. 2015, Goyal et al. 2017) with the official normalisation."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            reference_urls=["https://visualqa.org/evaluation.html", "https://arxiv.org/abs/1612.00837"],
        )

    def _compute(self, predictions, references):
        if not predictions:
            raise ValueError("vqa_accuracy got no predictions to score.")
        scores = []
        for index, (prediction, answers) in enumerate(zip(predictions, references)):
            if len(answers) == 0:
                raise ValueError(f"Question {index} has no reference answers.")
            normalized = [normalize_answer(answer) for answer in answers]
            scores.append(question_accuracy(normalize_answer(prediction), normalized))
        return {"vqa_accuracy": sum(scores) / len(scores)}
