"""Saving over an existing folder: an error or a kill at any point leaves the old folder or the new one, whole, and
the next save removes what a killed one left (hf_vlm.saving.replacing, used by save_run and the demo)."""

import copy
import hashlib
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from test_training import SCRIPTS, run_stage2
from transformers import Trainer, TrainingArguments

from hf_vlm import VLMForConditionalGeneration, saving
from hf_vlm.saving import recover, replacing, scratch_folder
from hf_vlm.training import save_run


def contents(folder: Path) -> dict[str, str]:
    """Every file under `folder`, subfolders included: relative path -> sha256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def siblings(folder: Path) -> list[str]:
    """What `replacing` writes beside `folder`: `.<name>.saving-...` and `.<name>.old-...`."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def run(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *map(str, args)], capture_output=True, text=True, timeout=300
    )


def old_folder(root: Path) -> Path:
    """A folder as an earlier save left it: files at the top, and subfolders (checkpoints) that must survive."""
    folder = root / "run"
    (folder / "checkpoint-1").mkdir(parents=True)
    (folder / "checkpoint-2").mkdir()
    (folder / "weights").write_text("old weights")
    (folder / "README.md").write_text("---\nlicense: mit\n---\na stale card")
    (folder / "checkpoint-1" / "state").write_text("step 1")
    (folder / "checkpoint-2" / "state").write_text("step 2")
    return folder


def test_replacing_swaps_in_the_new_files_and_keeps_subfolders(tmp_path):
    """The files written in the block replace the old ones (a stale card goes); subfolders stay; nothing is left beside it."""
    folder = old_folder(tmp_path)
    folder.chmod(0o750)
    with replacing(folder) as staging:
        assert staging.parent == folder.parent and contents(folder)["weights"]  # the old folder is untouched meanwhile
        (staging / "weights").write_text("new weights")
    assert {name: (folder / name).read_text() for name in contents(folder)} == {
        "weights": "new weights",
        "checkpoint-1/state": "step 1",
        "checkpoint-2/state": "step 2",
    }
    assert siblings(folder) == [] and folder.stat().st_mode & 0o777 == 0o750

    link = tmp_path / "link"  # a symlinked run folder is replaced where it lies
    link.symlink_to(folder)
    with replacing(link) as staging:
        (staging / "weights").write_text("through the link")
    assert link.is_symlink() and (folder / "weights").read_text() == "through the link" and siblings(folder) == []

    with replacing(tmp_path / "new" / "folder") as staging:  # a folder that does not exist yet
        (staging / "weights").write_text("first")
    assert (tmp_path / "new" / "folder" / "weights").read_text() == "first" and siblings(
        tmp_path / "new" / "folder"
    ) == []


@pytest.mark.parametrize(
    "error", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["exception", "KeyboardInterrupt"]
)
def test_an_error_while_writing_leaves_the_old_folder_and_no_staging(tmp_path, error):
    """An exception or Ctrl-C inside the block leaves the old folder byte for byte, and no staging folder."""
    folder = old_folder(tmp_path)
    before = contents(folder)
    with pytest.raises(type(error)):
        with replacing(folder) as staging:
            (staging / "weights").write_text("half")
            raise error
    assert contents(folder) == before and siblings(folder) == []


KILLED_IN_SAVE_PRETRAINED = """
import os, signal, sys
import transformers.modeling_utils
from transformers import Trainer, TrainingArguments
from hf_vlm import VLMForConditionalGeneration, VLMProcessor
from hf_vlm.training import save_run

source, target = sys.argv[1:]
model, processor = VLMForConditionalGeneration.from_pretrained(source), VLMProcessor.from_pretrained(source)
trainer = Trainer(model=model, args=TrainingArguments(output_dir=target, use_cpu=True, report_to="none"))

def killed(tensors, filename, metadata=None):  # the weights half written, then SIGKILL: no handler runs
    with open(filename, "wb") as file:
        file.write(b"\\0" * 4096)
    os.kill(os.getpid(), signal.SIGKILL)

transformers.modeling_utils.safe_save_file = killed
save_run(trainer, processor, target)
"""


def trainer_for(model, output_dir: Path) -> Trainer:
    return Trainer(
        model=copy.deepcopy(model), args=TrainingArguments(output_dir=str(output_dir), use_cpu=True, report_to="none")
    )


def test_save_run_killed_inside_save_pretrained_leaves_the_old_folder_and_the_next_save_cleans_up(built, tmp_path):
    """SIGKILL while save_run writes the weights leaves the old folder whole; the next save_run is complete and leaves no temp folder."""
    model, processor = built
    target = tmp_path / "stage1"
    save_run(trainer_for(model, target), processor, target)
    (target / "checkpoint-3").mkdir()
    (target / "checkpoint-3" / "trainer_state.json").write_text("{}")
    before = contents(target)

    result = run(KILLED_IN_SAVE_PRETRAINED, target, target)
    assert result.returncode == -9, result.stderr[-3000:]
    assert contents(target) == before  # the old weights, config and code, untouched
    assert [name.split("-")[0] for name in siblings(target)] == [".stage1.saving"]  # what the kill left

    changed = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in changed.model.multi_modal_projector.parameters():
            parameter.add_(1.0)
    save_run(trainer_for(changed, target), processor, target)
    assert siblings(target) == []
    assert set(contents(target)) == set(before)  # the same files, checkpoint-3 included
    saved = load_file(target / "model.safetensors")
    projector = {
        f"model.multi_modal_projector.{name}": p for name, p in changed.model.multi_modal_projector.named_parameters()
    }
    assert projector and all(torch.equal(saved[name], parameter) for name, parameter in projector.items())


KILLED_IN_SWAP = """
import os, signal, sys
from pathlib import Path
from hf_vlm.saving import replacing

target, kill_at = Path(sys.argv[1]), int(sys.argv[2])
calls, real_replace = [], os.replace

def replace(source, destination):  # SIGKILL just before the kill_at-th rename
    calls.append(source)
    if len(calls) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(source, destination)

os.replace = replace
with replacing(target) as folder:
    (folder / "weights").write_text("new weights")
"""


@pytest.mark.parametrize("kill_at", [2, 4], ids=["between the two renames", "while moving subfolders"])
def test_a_kill_during_the_swap_is_repaired_by_the_next_save(tmp_path, kill_at):
    """Killed between the swap's renames, the old folder lies whole beside the target and `recover` puts it back;
    killed while subfolders move, none is lost; either way the next save leaves the new files, every subfolder and no siblings."""
    folder = old_folder(tmp_path)
    before = contents(folder)
    result = run(KILLED_IN_SWAP, folder, kill_at)
    assert result.returncode == -9, result.stderr[-3000:]
    if kill_at == 2:
        assert not folder.exists()
        (previous,) = [folder.parent / name for name in siblings(folder) if ".old-" in name]
        assert contents(previous) == before
        recover(folder)
        assert contents(folder) == before and siblings(folder) == []
    else:
        assert (folder / "weights").read_text() == "new weights" and len(siblings(folder)) == 1
        recover(folder)
        assert {"weights", "checkpoint-1/state", "checkpoint-2/state"} == set(contents(folder)) and siblings(
            folder
        ) == []

    with replacing(folder) as staging:
        (staging / "weights").write_text("newer weights")
    assert (folder / "weights").read_text() == "newer weights"
    assert set(contents(folder)) == {"weights", "checkpoint-1/state", "checkpoint-2/state"} and siblings(folder) == []


def test_replacing_carries_over_the_users_files_and_drops_stale_model_files(tmp_path):
    """What the old folder has beyond a model save (notes, train_results.json, symlinks) stays; its stale shards,
    index, remote code and card go; a file the block wrote wins over the old one."""
    folder = old_folder(tmp_path)
    (tmp_path / "disk").mkdir()
    (folder / "data").symlink_to(tmp_path / "disk")
    (folder / "latest").symlink_to("checkpoint-2")
    (folder / "notes.txt").write_text("my notes")
    (folder / "train_results.json").write_text("{}")
    (folder / "config.json").write_text("old config")
    for stale in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "projectors.py",
        "tokenizer.json",
        "loss.png",
    ]:
        (folder / stale).write_text("stale")
    (folder / "README.md").write_text("---\nlibrary_name: transformers\n---\nAn old card.")
    (folder / "train.py").write_text("the user's script")
    (folder / "vocab_notes.txt").write_text("the user's notes")
    with replacing(folder) as staging:
        (staging / "model.safetensors").write_text("new weights")
        (staging / "config.json").write_text("new config")
    assert sorted(p.name for p in folder.iterdir()) == [
        "checkpoint-1",
        "checkpoint-2",
        "config.json",
        "data",
        "latest",
        "model.safetensors",
        "notes.txt",
        "train.py",
        "train_results.json",
        "vocab_notes.txt",
        "weights",
    ]  # `weights` is no model file's name: it is the user's
    assert (folder / "data").is_symlink() and (folder / "data").resolve() == tmp_path / "disk"
    assert (folder / "latest").is_symlink() and (folder / "latest" / "state").read_text() == "step 2"
    assert (folder / "notes.txt").read_text() == "my notes" and (folder / "config.json").read_text() == "new config"
    assert siblings(folder) == []


def test_a_readme_that_is_no_model_card_stays(tmp_path):
    """The user's own README.md (no YAML front matter) is carried over; a card is replaced."""
    folder = old_folder(tmp_path)
    (folder / "README.md").write_text("# My experiment notes")
    with replacing(folder) as staging:
        (staging / "model.safetensors").write_text("new weights")
    assert (folder / "README.md").read_text() == "# My experiment notes"


def test_the_working_directory_is_written_in_place_with_a_warning(tmp_path, monkeypatch):
    """`--output_dir .`: the folder is not renamed away (the working directory stays valid); the save warns it is not atomic."""
    folder = old_folder(tmp_path)
    monkeypatch.chdir(folder)
    with pytest.warns(UserWarning, match="not atomically, because it holds the working directory"):
        with replacing(".") as target:
            assert target == folder
            (target / "weights").write_text("new weights")
    assert Path(os.getcwd()) == folder and os.path.samefile(".", folder)
    assert (folder / "weights").read_text() == "new weights" and (folder / "checkpoint-1" / "state").exists()
    assert siblings(folder) == []


def test_a_mount_point_is_written_in_place_with_a_warning(tmp_path, monkeypatch):
    """A mount point (a Docker bind mount, which rename refuses with EBUSY) is written in place, with a warning."""
    folder = old_folder(tmp_path)
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == folder or real_ismount(path))
    with pytest.warns(UserWarning, match="it is a mount point"):
        with replacing(folder) as target:
            (target / "weights").write_text("new weights")
    assert target == folder and (folder / "weights").read_text() == "new weights" and siblings(folder) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write to any folder")
def test_a_folder_whose_parent_is_not_writable_is_written_in_place_with_a_warning(tmp_path):
    """A parent the user cannot write to, where no sibling can be made, gets a warning and an in-place save."""
    folder = old_folder(tmp_path / "parent")
    folder.parent.chmod(0o555)
    try:
        with pytest.warns(UserWarning, match="is not writable"):
            with replacing(folder) as target:
                (target / "weights").write_text("new weights")
    finally:
        folder.parent.chmod(0o755)
    assert target == folder and (folder / "weights").read_text() == "new weights" and siblings(folder) == []


def test_the_swap_is_refused_exactly_where_renaming_would_break(tmp_path, monkeypatch):
    """The decision itself, root or not: a plain folder is swapped; the working directory, a folder above it and a
    folder whose parent the user cannot write to (os.access as a non-root user sees it) are not."""
    folder = old_folder(tmp_path)
    assert saving._cannot_swap(folder) is None
    monkeypatch.chdir(folder / "checkpoint-1")
    assert (
        saving._cannot_swap(folder) == saving._cannot_swap(folder / "checkpoint-1") == "it holds the working directory"
    )
    monkeypatch.chdir(tmp_path.parent)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path and real_access(path, mode))
    assert saving._cannot_swap(folder) == f"its parent {tmp_path} is not writable"


needs_flock = pytest.mark.skipif(saving.fcntl is None, reason="no fcntl: leftovers are known by host and pid only")

HOLDS_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
time.sleep(300)
"""


@needs_flock
def test_leftovers_whose_lock_no_process_holds_are_removed_whatever_their_host(tmp_path):
    """Leftovers named after another host (a Docker container's random hostname) or a pid now reused are removed
    when no process holds their lock: staging and old folders beside a model folder, copies under a scratch parent."""
    folder = old_folder(tmp_path)
    for name in [".run.saving-3f2a9c1d7e6b-1-abcd1234", f".run.saving-{socket.gethostname()}-{os.getpid()}-abcd1234"]:
        (folder.parent / name).mkdir()
        (folder.parent / name / "model.safetensors").write_text("half")
    (folder.parent / ".run.old-3f2a9c1d7e6b-1-abcd1234" / "checkpoint-0").mkdir(parents=True)
    with replacing(folder) as staging:
        (staging / "weights").write_text("new weights")
    assert siblings(folder) == [] and (folder / "checkpoint-0").is_dir()  # the old folder's subfolder was carried over

    parent = tmp_path / "scratch"
    (parent / "3f2a9c1d7e6b-1-abcd1234").mkdir(parents=True)
    with scratch_folder(parent) as copy_folder:
        assert sorted(parent.iterdir()) == [copy_folder]
    assert list(parent.iterdir()) == []


@needs_flock
def test_leftovers_whose_lock_a_live_process_holds_are_left_alone(tmp_path):
    """A staging folder or scratch copy locked by a running process (a save elsewhere, another host's name) survives
    another save; once that process has ended, the next save removes it."""
    folder = old_folder(tmp_path)
    running = folder.parent / ".run.saving-3f2a9c1d7e6b-1-abcd1234"
    copy_in_use = tmp_path / "scratch" / "3f2a9c1d7e6b-1-abcd1234"
    for path in [running, copy_in_use]:
        path.mkdir(parents=True)
    holders = [
        subprocess.Popen([sys.executable, "-c", HOLDS_LOCK, str(path)], stdout=subprocess.PIPE, text=True)
        for path in [running, copy_in_use]
    ]
    try:
        assert [holder.stdout.readline() for holder in holders] == ["locked\n", "locked\n"]
        with replacing(folder) as staging:
            (staging / "weights").write_text("new weights")
        with scratch_folder(tmp_path / "scratch"):
            pass
        assert siblings(folder) == [running.name] and copy_in_use.is_dir()
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
    recover(folder)
    with scratch_folder(tmp_path / "scratch"):
        pass
    assert siblings(folder) == [] and list((tmp_path / "scratch").iterdir()) == []


TRIES_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("free")
except BlockingIOError:
    print("held")
"""


@needs_flock
def test_the_old_and_the_new_folder_stay_locked_through_the_swap(tmp_path, monkeypatch):
    """Right after each of the swap's renames another process finds the folder just renamed (`.old-...`, then the
    new one) locked, so a save starting meanwhile cannot take it for a leftover; afterwards the folder is free."""
    folder = old_folder(tmp_path)
    seen, real_replace = [], os.replace

    def replace(source, destination):
        real_replace(source, destination)
        if len(seen) < 2:
            seen.append((Path(destination).name.split("-")[0], run(TRIES_LOCK, destination).stdout.strip()))

    monkeypatch.setattr(os, "replace", replace)
    with replacing(folder) as staging:
        (staging / "weights").write_text("new weights")
    assert seen == [(".run.old", "held"), ("run", "held")]
    assert run(TRIES_LOCK, folder).stdout.strip() == "free"


def test_without_locks_leftovers_are_known_by_host_and_pid(tmp_path, monkeypatch):
    """Where locks are unavailable (Windows, NFS), a leftover of this host whose process has ended goes; one of a
    running process, or of another host, stays."""
    monkeypatch.setattr(saving, "fcntl", None)
    folder = old_folder(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    names = {
        state: f".run.saving-{host}-{pid}-abcd1234"
        for state, host, pid in [
            ("dead", socket.gethostname(), int(dead.stdout)),
            ("running", socket.gethostname(), os.getppid()),
            ("elsewhere", "3f2a9c1d7e6b", int(dead.stdout)),
        ]
    }
    for name in names.values():
        (folder.parent / name).mkdir()
    with replacing(folder) as staging:
        (staging / "weights").write_text("new weights")
    assert siblings(folder) == sorted([names["running"], names["elsewhere"]])


def test_demo_model_folder_is_replaced_whole(built, tmp_path, monkeypatch):
    """The demo's model folder: a failure while writing the card keeps the previous folder; a success has weights and
    card, keeps the user's file and drops an old shard."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import demo

    model, processor = built
    results = {"metrics": {"overall": {"accuracy": 0.5}}, "settings": {"num_questions": 4}}
    data = SimpleNamespace(max_samples=4, dataset="easy_vqa")
    stage1 = [None, data, SimpleNamespace(learning_rate=1e-3)]
    stage2 = [None, data, SimpleNamespace(projector_learning_rate=1e-3), SimpleNamespace(learning_rate=1e-4)]
    target = tmp_path / "model"
    target.mkdir()
    (target / "notes.txt").write_text("the user's")
    (target / "model-00001-of-00002.safetensors").write_text("from an earlier run")
    demo.save_model_folder(model, processor, target, results, stage1, stage2)
    assert {"README.md", "model.safetensors", "config.json", "processor_config.json", "notes.txt"} <= set(
        contents(target)
    )
    assert "model-00001-of-00002.safetensors" not in contents(target) and siblings(target) == []
    before = contents(target)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ModelCard, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        demo.save_model_folder(model, processor, target, {**results, "settings": {"num_questions": 8}}, stage1, stage2)
    assert contents(target) == before and siblings(target) == []


def test_stage2_output_has_no_trl_card_and_keeps_its_checkpoints(built, tmp_path):
    """A stage-2 run that saves checkpoints leaves no TRL README.md (a text-generation card of model "None") in its
    output folder; its checkpoints survive the final save, and the folder loads."""
    model, processor = built
    start = tmp_path / "stage1"
    model.save_pretrained(start)
    processor.save_pretrained(start)
    output_dir = tmp_path / "stage2"
    trainer = run_stage2(start, output_dir, max_samples=8, max_steps=2, save_strategy="steps", save_steps=1)

    assert not (output_dir / "README.md").exists()
    trainer.create_model_card(model_name="stage2")  # what TRL calls at every checkpoint and in push_to_hub
    assert not (output_dir / "README.md").exists()
    assert {"checkpoint-1", "checkpoint-2"} <= {p.name for p in output_dir.iterdir() if p.is_dir()}
    assert siblings(output_dir) == []
    VLMForConditionalGeneration.from_pretrained(output_dir)


def test_a_save_that_writes_no_weights_raises_and_keeps_the_old_model(built, tmp_path, monkeypatch):
    """If the trainer's save writes no weights (an FSDP SHARDED_STATE_DICT does that), save_run raises and the old
    model stays, instead of swapping in a folder without weights."""
    model, processor = built
    target = tmp_path / "model"
    save_run(trainer_for(model, target), processor, target)
    before = contents(target)
    monkeypatch.setattr(Trainer, "save_model", lambda self, output_dir=None, _internal_call=False: None)
    with pytest.raises(RuntimeError, match="wrote no weights"):
        save_run(trainer_for(model, target), processor, target)
    assert contents(target) == before and siblings(target) == []
