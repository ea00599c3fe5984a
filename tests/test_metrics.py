"""The metric scripts in hf_vlm.metrics, loaded through `evaluate` from the package folder, offline."""

import ast
import math
import os
import shutil
import socket
import sys
import urllib.request
from pathlib import Path

import evaluate
import pytest

import hf_vlm.metrics


@pytest.fixture(scope="module")
def hf_home():
    """The session's private HF home (tests/conftest.py): evaluate copies scripts into its modules cache."""
    root = Path(os.environ["HF_HOME"])
    assert Path(evaluate.config.HF_MODULES_CACHE).is_relative_to(root)
    return root


@pytest.fixture(scope="module")
def vqa(hf_home):
    return evaluate.load(hf_vlm.metrics.path("vqa_accuracy"))


@pytest.fixture(scope="module")
def captions(hf_home):
    return evaluate.load(hf_vlm.metrics.path("caption_metrics"))


def vqa_score(metric, prediction, references):
    return metric.compute(predictions=[prediction], references=[references])["vqa_accuracy"]


# hf_vlm.metrics.path


def test_path_is_the_folder_holding_the_script():
    """path(name) is a folder inside the package that holds name/name.py."""
    for name in ("vqa_accuracy", "caption_metrics"):
        folder = Path(hf_vlm.metrics.path(name))
        assert (folder / f"{name}.py").is_file()
        assert folder.parent == Path(hf_vlm.metrics.__file__).resolve().parent


def test_path_of_unknown_metric_lists_the_known_ones():
    """An unknown name raises a ValueError that names the available metrics."""
    with pytest.raises(ValueError, match="caption_metrics, vqa_accuracy"):
        hf_vlm.metrics.path("accuracy")


def test_metrics_init_imports_only_the_standard_library():
    """metrics/__init__.py stays light: no torch, no evaluate, no other hf_vlm module."""
    tree = ast.parse(Path(hf_vlm.metrics.__file__).read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0
    }
    assert not any(isinstance(node, ast.ImportFrom) and node.level > 0 for node in ast.walk(tree))
    assert imported and imported <= sys.stdlib_module_names


def test_load_copies_scripts_into_the_private_cache(vqa, captions, hf_home):
    """evaluate.load imports the scripts from the test's HF_MODULES_CACHE, not the user's cache."""
    copied = {path.name for path in (hf_home / "modules").rglob("*.py")}
    assert {"vqa_accuracy.py", "caption_metrics.py"} <= copied
    assert vqa.name == "vqa_accuracy" and captions.name == "caption_metrics"


# vqa_accuracy


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("Two", "2", 1.0),  # number word -> digit, lower-case
        ("a red circle.", "red circle", 1.0),  # article dropped, final period dropped
        ("yes", "no", 0.0),
        ("1,000", "1000", 1.0),  # a digit-comma-digit answer deletes its punctuation
        ("t-shirt", "t shirt", 1.0),  # a hyphen touching no space becomes a space
        ("dont", "don't", 1.0),  # contraction given its apostrophe back
        ("2.5", "25", 0.0),  # a period before a digit is kept
        ("none", "0", 1.0),
        (" The  Dog!\n", "dog", 1.0),  # whitespace collapsed, "!" touching the end deleted
    ],
)
def test_vqa_single_reference_is_exact_match_after_normalisation(vqa, prediction, reference, expected):
    """With one reference the score is 1 when the normalised answers are equal, else 0."""
    assert vqa_score(vqa, prediction, [reference]) == expected


# Ten references, k of them equal to the prediction. Leaving out a matching annotator leaves k - 1
# matches among nine (k such subsets); leaving out another leaves k (10 - k subsets); each subset
# scores min(matches / 3, 1), and the score is the mean over the ten subsets:
#   k = 1: (1 * 0   + 9 * 1/3) / 10 = 3/10 = 0.3
#   k = 2: (2 * 1/3 + 8 * 2/3) / 10 = 6/10 = 0.6
#   k = 3: (3 * 2/3 + 7 * 1)   / 10 = 9/10 = 0.9   (not 1.0: three agreeing annotators are not enough)
#   k = 4: (4 * 1   + 6 * 1)   / 10 = 1.0, and 1.0 for every larger k.
@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_vqa_ten_references_average_the_leave_one_out_subsets(vqa, k, expected):
    """k of 10 annotators agreeing scores 0, .3, .6, .9, then 1.0 from k = 4 (worked out above)."""
    references = ["Yes"] * k + ["no"] * (10 - k)
    assert vqa_score(vqa, "yes", references) == pytest.approx(expected, abs=1e-12)


def test_vqa_few_references_use_a_threshold_of_n_minus_1(vqa):
    """With 2-4 references the threshold is n - 1, so unanimous references still give 1.0."""
    assert vqa_score(vqa, "cat", ["cat", "cat"]) == 1.0
    # 2 references, threshold 1: leaving out "cat" leaves 0 matches, leaving out "dog" leaves 1.
    assert vqa_score(vqa, "cat", ["cat", "dog"]) == 0.5
    # 3 references, threshold 2: out "cat" -> 1/2 (twice), out "dog" -> 2/2; (1/2 + 1/2 + 1) / 3.
    assert vqa_score(vqa, "cat", ["cat", "cat", "dog"]) == pytest.approx(2 / 3)


def test_vqa_is_the_mean_over_questions(vqa):
    """The corpus score is the plain mean of the per-question scores (1, 0, 0.6 -> 0.5333)."""
    result = vqa.compute(
        predictions=["two", "yes", "red"],
        references=[["2"], ["no"], ["red"] * 2 + ["blue"] * 8],
    )
    assert result == {"vqa_accuracy": pytest.approx((1.0 + 0.0 + 0.6) / 3)}


def test_vqa_rejects_a_question_without_references(hf_home):
    """An empty reference list is an error that names the question."""
    # A compute that raises leaves evaluate's cache-file lock held, and every instance sharing that
    # cache file would then wait a second for it: give this one its own file.
    vqa = evaluate.load(hf_vlm.metrics.path("vqa_accuracy"), experiment_id="empty-references")
    with pytest.raises(ValueError, match="Question 1 has no reference answers"):
        vqa.compute(predictions=["yes", "no"], references=[["yes"], []])


def test_add_batch_then_compute_equals_one_compute(vqa):
    """Accumulating two batches with add_batch gives the same score as one compute call."""
    predictions, references = ["two", "yes", "red", "square"], [["2"], ["no"], ["red", "blue"], ["circle"]]
    vqa.add_batch(predictions=predictions[:2], references=references[:2])
    vqa.add_batch(predictions=predictions[2:], references=references[2:])
    assert vqa.compute() == vqa.compute(predictions=predictions, references=references)
    assert vqa.compute(predictions=predictions, references=references)["vqa_accuracy"] == pytest.approx(1.5 / 4)


def test_combine_reports_every_metric(vqa, captions):
    """evaluate.combine of both scripts returns the union of their results, values unchanged."""
    predictions = ["a red circle on white", "two blue squares side by side"]
    references = [["a red circle on white"], ["two blue squares in a row"]]
    combined = evaluate.combine([vqa, captions]).compute(predictions=predictions, references=references)
    separate = vqa.compute(predictions=predictions, references=references)
    separate |= captions.compute(predictions=predictions, references=references)
    assert combined == separate
    assert set(combined) == {"vqa_accuracy", "bleu4", "cider", "rouge_l"}


# caption_metrics


def test_captions_perfect_corpus(captions):
    """Captions equal to their references up to case and punctuation: BLEU-4 1, CIDEr 10, ROUGE-L 1."""
    result = captions.compute(
        predictions=["A red circle on white.", "Two blue squares, side by side!"],
        references=[["a red circle on white"], ["two blue squares side by side"]],
    )
    # pycocoevalcap's 1e-15 / 1e-9 smoothing constants keep BLEU a hair under 1.
    assert result["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert result["cider"] == pytest.approx(10.0)
    assert result["rouge_l"] == pytest.approx(1.0)


def test_bleu4_and_rouge_l_hand_worked(captions):
    """One image, hypothesis 'one two three four five' against 'one two three four six'."""
    result = captions.compute(predictions=["one two three four five"], references=[["one two three four six"]])
    # Clipped n-gram precisions 4/5, 3/4, 2/3, 1/2; equal lengths, so no brevity penalty.
    assert result["bleu4"] == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, abs=1e-6)  # 0.6687
    # LCS 4 of 5 tokens both ways: P = R = 0.8, and F_beta of equal P and R is 0.8.
    assert result["rouge_l"] == pytest.approx(0.8)


def test_bleu4_is_corpus_level_with_brevity_penalty(captions):
    """BLEU-4 pools n-gram counts over images and applies one brevity penalty to the corpus."""
    result = captions.compute(
        predictions=["one two three four five", "one two three"],
        references=[["one two three four six"], ["one two three four five six"]],
    )
    # Correct / guessed n-grams summed over both images: 1-grams (4+3)/(5+3), 2-grams (3+2)/(4+2),
    # 3-grams (2+1)/(3+1), 4-grams (1+0)/(2+0). Lengths 8 against 5+6 = 11: BP = exp(1 - 11/8).
    precisions = 7 / 8 * 5 / 6 * 3 / 4 * 1 / 2
    assert result["bleu4"] == pytest.approx(precisions**0.25 * math.exp(1 - 11 / 8), abs=1e-6)  # 0.4970
    # ROUGE-L is a per-image mean. Image 2: LCS 3, P = 3/3, R = 3/6, F = 2.44 * 1 * 0.5 / (0.5 + 1.44).
    assert result["rouge_l"] == pytest.approx((0.8 + 2.44 * 0.5 / 1.94) / 2)


def test_cider_hand_worked(captions):
    """Two images with disjoint words, one caption exact and one sharing nothing: CIDEr (10 + 0) / 2."""
    # Every reference n-gram occurs in one of the two images, so each has IDF log(2/1) > 0. Image 1's
    # caption equals its reference: cosine 1 for n = 1..4, no length penalty, times 10. Image 2's
    # caption has no n-gram of its reference: 0.
    result = captions.compute(
        predictions=["a red circle on white", "three green stars in rows"],
        references=[["a red circle on white"], ["two blue squares side by side"]],
    )
    assert result["cider"] == pytest.approx(5.0)


def test_cider_of_a_single_image_is_zero(captions):
    """CIDEr's IDF comes from the evaluated corpus: with one image every n-gram has IDF 0."""
    result = captions.compute(predictions=["a red circle on white"], references=[["a red circle on white"]])
    assert result["cider"] == 0.0
    assert result["rouge_l"] == pytest.approx(1.0)


PTB_SENTENCES = [
    "A man's dog, running -- fast! on the grass.",
    'Two dogs play; it isn\'t 3.5 m/s "quoted" e-mail...',
    "They can't go, won't go.",
    "A 1,000-piece puzzle costs $5 or 50% off & more: yes?",
    "The kids' toys and 'single' quotes; I'm here, you're there, we'll see, I'd go, they've",
    "A two-story house with a red door.",
]


def test_tokenize_on_ordinary_captions(captions):
    """The Python tokenisation splits clitics and symbols and drops punctuation, as COCO's PTB does."""
    tokenize = sys.modules[type(captions).__module__].tokenize
    assert tokenize(PTB_SENTENCES[0]) == "a man 's dog running fast on the grass"
    assert tokenize(PTB_SENTENCES[2]) == "they ca n't go wo n't go"
    assert tokenize(PTB_SENTENCES[3]) == "a 1,000-piece puzzle costs $ 5 or 50 % off & more yes"


@pytest.mark.skipif(shutil.which("java") is None, reason="COCO's PTB tokenizer runs on Java")
def test_tokenize_matches_coco_ptb_tokenizer(captions):
    """On ordinary captions our tokenisation equals pycocoevalcap's Java PTB tokenizer."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    if not os.access(os.path.dirname(ptbtokenizer.__file__), os.W_OK):
        pytest.skip("the PTB wrapper writes a temporary file next to itself")
    coco = ptbtokenizer.PTBTokenizer().tokenize({i: [{"caption": s}] for i, s in enumerate(PTB_SENTENCES)})
    tokenize = sys.modules[type(captions).__module__].tokenize
    assert [tokenize(sentence) for sentence in PTB_SENTENCES] == [coco[i][0] for i in range(len(PTB_SENTENCES))]


# offline


class NetworkBlocked(RuntimeError):
    """Raised by the socket patches; not an OSError, so no client retries it or mistakes it for a timeout."""


def test_load_and_compute_open_no_connection(hf_home, monkeypatch):
    """evaluate.load(path) and compute make no connection, under a blocker shown to catch real ones."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise NetworkBlocked(repr(args))

    # A live loopback listener: a connection the blocker missed would succeed instead of raising.
    with socket.create_server(("127.0.0.1", 0)) as server:
        host, port = server.getsockname()
        for name in ("create_connection", "getaddrinfo"):
            monkeypatch.setattr(socket, name, refuse)
        monkeypatch.setattr(socket.socket, "connect", refuse)
        monkeypatch.setattr(socket.socket, "connect_ex", refuse)

        with pytest.raises(NetworkBlocked):
            socket.create_connection((host, port))
        with socket.socket() as client, pytest.raises(NetworkBlocked):
            client.connect((host, port))
        with pytest.raises(NetworkBlocked):
            urllib.request.urlopen(f"http://{host}:{port}/", timeout=1)
        assert len(attempts) == 3
        attempts.clear()

        vqa = evaluate.load(hf_vlm.metrics.path("vqa_accuracy"))
        captions = evaluate.load(hf_vlm.metrics.path("caption_metrics"))
        assert vqa.compute(predictions=["Two"], references=[["2"]]) == {"vqa_accuracy": 1.0}
        assert captions.compute(predictions=["a red circle"], references=[["a red circle"]])["rouge_l"] == 1.0
    assert attempts == []
