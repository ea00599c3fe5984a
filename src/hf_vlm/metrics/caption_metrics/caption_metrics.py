"""COCO caption metrics (BLEU-4, CIDEr-D, ROUGE-L) for `evaluate`; pycocoevalcap does the scoring.

Load it with `evaluate.load(hf_vlm.metrics.path("caption_metrics"))`. The scorers are the ones the
COCO caption evaluation server uses (`pycocoevalcap`'s `Bleu`, `Cider`, `Rouge`); only the
tokenisation is ours, a Python imitation of the PTB tokenizer, so that no Java is needed.
"""

import re

import datasets
import evaluate
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

_DESCRIPTION = """\
Captioning metrics as the COCO caption evaluation computes them, through pycocoevalcap:

- bleu4: corpus-level BLEU-4 from pycocoevalcap's `Bleu` (n-gram counts clipped by the references,
  brevity penalty against the closest reference length), a fraction in [0, 1]; its tiny
  smoothing constants leave a perfect match at 1 - 2e-10. It differs from sacrebleu's BLEU, which
  has its own tokenizer, reports 0-100 and smooths differently.
- cider: CIDEr-D from pycocoevalcap's `Cider` (TF-IDF n-gram vectors for n = 1..4, clipped, with
  a Gaussian length penalty, sigma 6), times 10 as in COCO papers: 0 to 10, strong models score
  around 1. The IDF is computed over the references of the evaluated corpus, so the score depends
  on the whole corpus, and a corpus of one image scores 0 whatever the caption (every n-gram then
  has IDF log(1/1) = 0). Report CIDEr on a full test split.
- rouge_l: ROUGE-L from pycocoevalcap's `Rouge`: the longest common subsequence with each
  reference, best precision and best recall taken separately, F-measure with beta = 1.2, averaged
  over images; a fraction in [0, 1].

Before scoring, captions are tokenised the way COCO's PTB tokenizer does it, re-done in Python:
lower-case; split off "n't" and the clitics 's 'm 'd 're 've 'll ("don't" -> "do n't", "man's" ->
"man 's"); keep words joined by - / . and digits joined by a comma as one token ("two-story",
"m/s", "3.5", "1,000"); split off other symbols ("$5" -> "$ 5"); then drop the tokens
' " ` . ? ! , : ; - and brackets. This matches the Java tokenizer on ordinary captions. Known
differences: abbreviations lose their last period ("u.s." -> "u.s"), "cannot" and "gonna" stay
whole, and brackets are dropped where COCO keeps them as "-lrb-"/"-rrb-".
"""

_CITATION = """\
@inproceedings{papineni2002bleu,
  title     = {{BLEU}: a Method for Automatic Evaluation of Machine Translation},
  author    = {Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing},
  booktitle = {Proceedings of the 40th Annual Meeting of the ACL},
  year      = {2002}
}
@inproceedings{vedantam2015cider,
  title     = {{CIDEr}: Consensus-based Image Description Evaluation},
  author    = {Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle = {Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2015}
}
@inproceedings{lin2004rouge,
  title     = {{ROUGE}: A Package for Automatic Evaluation of Summaries},
  author    = {Lin, Chin-Yew},
  booktitle = {Text Summarization Branches Out},
  year      = {2004}
}
@article{chen2015microsoft,
  title   = {Microsoft {COCO} Captions: Data Collection and Evaluation Server},
  author  = {Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh
             and Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  journal = {arXiv preprint arXiv:1504.00325},
  year    = {2015}
}
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list[str]`): one generated caption per image.
    references (`list[list[str]]`): the reference captions of each image, one or more (COCO has
        about five).
Returns:
    bleu4 (`float`): corpus BLEU-4 in [0, 1].
    cider (`float`): CIDEr-D in [0, 10], IDF taken over this corpus.
    rouge_l (`float`): mean ROUGE-L in [0, 1].
Examples:
    >>> captions = evaluate.load(hf_vlm.metrics.path("caption_metrics"))
    >>> captions.compute(
    ...     predictions=["A red circle on white.", "two blue squares side by side"],
    ...     references=[["a red circle on white"], ["two blue squares side by side"]],
    ... )
    {'bleu4': 0.9999999997728718, 'cider': 10.0, 'rouge_l': 1.0}
"""

_NOT = re.compile(r"n't\b")
# Order matters: clitics first, then words with inner - / . (or a comma between digits), then any
# other single symbol.
_TOKEN = re.compile(r"n't|'(?:s|m|d|re|ve|ll)\b|\w+(?:(?:[-/.]|(?<=\d),(?=\d))\w+)*|\S")
_DROPPED = {"'", '"', "`", ".", "?", "!", ",", ":", ";", "-", "(", ")", "[", "]", "{", "}"}


def tokenize(caption: str) -> str:
    """Lower-case and PTB-tokenise one caption, dropping punctuation; tokens joined by spaces."""
    text = _NOT.sub(" n't", caption.lower())
    return " ".join(token for token in _TOKEN.findall(text) if token not in _DROPPED)


class CaptionMetrics(evaluate.Metric):
    """BLEU-4, CIDEr-D and ROUGE-L as in the COCO caption evaluation (Chen et al. 2015)."""

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
            codebase_urls=["https://github.com/salaniz/pycocoevalcap"],
            reference_urls=["https://arxiv.org/abs/1504.00325", "https://arxiv.org/abs/1411.5726"],
        )

    def _compute(self, predictions, references):
        if not predictions:
            raise ValueError("caption_metrics got no predictions to score.")
        # pycocoevalcap takes {image id: [tokenised captions]}; the position in the batch is the id.
        results, ground_truths = {}, {}
        for index, (prediction, captions) in enumerate(zip(predictions, references)):
            if len(captions) == 0:
                raise ValueError(f"Image {index} has no reference captions.")
            results[index] = [tokenize(prediction)]
            ground_truths[index] = [tokenize(caption) for caption in captions]
        bleu, _ = Bleu(4).compute_score(ground_truths, results, verbose=0)
        cider, _ = Cider().compute_score(ground_truths, results)
        rouge_l, _ = Rouge().compute_score(ground_truths, results)
        return {"bleu4": float(bleu[3]), "cider": float(cider), "rouge_l": float(rouge_l)}
