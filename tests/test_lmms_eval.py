"""lmms-eval's run of the local easy-VQA task (docs/lmms_eval/) on a tiny saved model equals hf_vlm's own evaluation.

Needs lmms-eval, which hf_vlm does not depend on; skipped where it is missing. CI runs it in a venv layered over the
project's (docs/lmms_eval/layered_venv.sh, docs/lmms_eval.md).
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hf_vlm.evaluation import easy_vqa_test_questions, generate_answers, postprocess_answer
from hf_vlm.metrics.vqa_accuracy.vqa_accuracy import normalize_answer, question_accuracy

TASK_FOLDER = Path(__file__).resolve().parents[1] / "docs" / "lmms_eval"
NUM_QUESTIONS = 12


def load_export():
    spec = importlib.util.spec_from_file_location("export_data", TASK_FOLDER / "export_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.export


@pytest.fixture
def lmms_eval_installed():
    """Skips the test, before it builds anything, where lmms-eval is missing."""
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (an optional tool; see docs/lmms_eval.md)")


def run_lmms_eval(model_folder, tasks_folder, tmp_path) -> tuple[int, str]:
    """`docs/lmms_eval/run.py` on the task in `tasks_folder`, offline: its exit status and the tail of its output."""
    command = [sys.executable, str(TASK_FOLDER / "run.py"), "--model", "hf_vlm"]
    command += ["--model_args", f"pretrained={model_folder},device=cpu,device_map=cpu"]
    command += ["--tasks", "easy_vqa_hf_vlm", "--include_path", str(tasks_folder), "--batch_size", "4"]
    command += ["--output_path", str(tmp_path / "out"), "--log_samples"]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=800)
    return result.returncode, result.stdout[-2000:] + result.stderr[-4000:]


def only_file(folder: Path, pattern: str, output: str) -> Path:
    files = list(folder.rglob(pattern))
    assert len(files) == 1, f"{len(files)} files {pattern} under {folder}; lmms-eval printed:\n{output}"
    return files[0]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lmms_eval_accuracy_equals_hf_vlm_evaluation(lmms_eval_installed, built, tmp_path):
    """Offline, lmms-eval's answers to the local task and their VQA accuracy equal hf_vlm's generate_answers'."""
    model, processor = built
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    load_export()(NUM_QUESTIONS, str(tmp_path / "data"))
    # The committed task, pointed at this test's data folder.
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    shutil.copy(TASK_FOLDER / "utils.py", tasks)
    task = (TASK_FOLDER / "easy_vqa_hf_vlm.yaml").read_text()
    assert "dataset_path: runs/lmms_eval/easy_vqa_test\n" in task
    task = task.replace("dataset_path: runs/lmms_eval/easy_vqa_test", f"dataset_path: {tmp_path / 'data'}")
    (tasks / "easy_vqa_hf_vlm.yaml").write_text(task)

    returncode, output = run_lmms_eval(tmp_path / "model", tasks, tmp_path)
    assert returncode == 0, output
    results_file = only_file(tmp_path / "out", "*_results.json", output)
    accuracy = json.loads(results_file.read_text())["results"]["easy_vqa_hf_vlm"]["vqa_accuracy,none"]
    samples_file = only_file(tmp_path / "out", "*_samples_easy_vqa_hf_vlm.jsonl", output)
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert len(samples) == NUM_QUESTIONS

    questions = easy_vqa_test_questions(NUM_QUESTIONS)
    predictions = generate_answers(model, processor, questions, batch_size=4, max_new_tokens=8)
    scores = [
        question_accuracy(normalize_answer(prediction), [normalize_answer(answer) for answer in answers])
        for prediction, answers in zip(predictions, questions["answers"])
    ]
    assert [sample["vqa_accuracy"] for sample in samples] == scores
    assert accuracy == pytest.approx(sum(scores) / len(scores), abs=1e-12)
    assert [postprocess_answer(sample["filtered_resps"]) for sample in samples] == predictions


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_run_py_exits_1_where_lmms_eval_logs_a_failed_evaluation_and_exits_0(lmms_eval_installed, tmp_path):
    """A model folder that does not exist: lmms-eval catches the load error and logs it; run.py's status says so."""
    returncode, output = run_lmms_eval(tmp_path / "no-such-model", TASK_FOLDER, tmp_path)
    assert "Error during evaluation" in output, output
    assert returncode == 1, output
    assert not (tmp_path / "out").exists()
