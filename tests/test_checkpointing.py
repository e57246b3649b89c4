import json
from pathlib import Path

import pytest

from diffusers_curriculum.checkpointing import list_checkpoints, resolve_resume_path, save_checkpoint
from diffusers_curriculum.errors import UsageError


class FakeAccelerator:
    """Writes a checkpoint like accelerate does; can die half-way through like a killed process."""

    is_main_process = True

    def __init__(self, crash_after_files=None):
        self.crash_after_files = crash_after_files

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        Path(path).mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(["model.safetensors", "optimizer.bin", "random_states_0.pkl"]):
            if self.crash_after_files is not None and i == self.crash_after_files:
                raise KeyboardInterrupt("killed while writing")
            (Path(path) / name).write_text(name)


def test_checkpoint_interrupted_mid_write_never_replaces_a_good_one(tmp_path):
    save_checkpoint(FakeAccelerator(), tmp_path, 10)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(FakeAccelerator(crash_after_files=1), tmp_path, 20)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-10"]
    assert resolve_resume_path(tmp_path, "latest").name == "checkpoint-10"
    assert sorted(p.name for p in (tmp_path / "checkpoint-10").iterdir()) == ["model.safetensors", "optimizer.bin", "random_states_0.pkl"]
    # The next save of the same step cleans the leftover and lands completely.
    save_checkpoint(FakeAccelerator(), tmp_path, 20)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-20"]
    assert not (tmp_path / ".checkpoint-20.tmp").exists()


def test_interrupted_resave_of_an_existing_step_keeps_the_old_copy(tmp_path):
    save_checkpoint(FakeAccelerator(), tmp_path, 5)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(FakeAccelerator(crash_after_files=2), tmp_path, 5)
    assert len(list((tmp_path / "checkpoint-5").iterdir())) == 3


def test_total_limit_rotates_after_the_new_checkpoint_lands(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(FakeAccelerator(), tmp_path, step, total_limit=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3"]
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(FakeAccelerator(crash_after_files=0), tmp_path, 4, total_limit=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3"]


def test_latest_orders_by_step_not_by_name(tmp_path):
    for step in (9, 10, 100):
        save_checkpoint(FakeAccelerator(), tmp_path, step)
    assert resolve_resume_path(tmp_path, "latest").name == "checkpoint-100"


def test_resume_path_resolution(tmp_path):
    assert resolve_resume_path(tmp_path, None) is None
    assert resolve_resume_path(tmp_path, "latest") is None  # nothing yet: a fresh start
    save_checkpoint(FakeAccelerator(), tmp_path, 3)
    assert resolve_resume_path(tmp_path, "checkpoint-3") == tmp_path / "checkpoint-3"
    assert resolve_resume_path(tmp_path, str(tmp_path / "checkpoint-3")) == tmp_path / "checkpoint-3"
    with pytest.raises(UsageError, match="no checkpoint folder"):
        resolve_resume_path(tmp_path, "checkpoint-4")
    (tmp_path / "weights").mkdir()
    with pytest.raises(UsageError, match="not a checkpoint-<step> folder"):
        resolve_resume_path(tmp_path, str(tmp_path / "weights"))


def index(tag):
    return {"_class_name": "DDPMPipeline", "tag": tag, "unet": ["diffusers", "UNet2DModel"]}


def read_index(folder):
    return json.loads((folder / "model_index.json").read_text())


class FakePipeline:
    """Writes a pipeline folder like diffusers does (model_index.json first); may die half-way."""

    def __init__(self, tag, crash=False):
        self.tag, self.crash = tag, crash

    def save_pretrained(self, path):
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "model_index.json").write_text(json.dumps(index(self.tag)))
        (path / "unet").mkdir()
        (path / "unet" / "config.json").write_text(self.tag)
        if self.crash:
            raise KeyboardInterrupt("killed while saving the pipeline")
        (path / "unet" / "diffusion_pytorch_model.safetensors").write_text(self.tag)
        (path / "scheduler").mkdir()
        (path / "scheduler" / "scheduler_config.json").write_text(self.tag)


def test_save_pipeline_replaces_a_previous_pipeline_completely(tmp_path):
    from diffusers_curriculum.checkpointing import save_pipeline

    save_checkpoint(FakeAccelerator(), tmp_path, 1)
    save_pipeline(FakePipeline("first"), tmp_path)
    save_pipeline(FakePipeline("second"), tmp_path)
    assert read_index(tmp_path) == index("second")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "model_index.json", "scheduler", "unet"]


def test_save_pipeline_killed_mid_write_leaves_the_previous_pipeline(tmp_path):
    from diffusers_curriculum.checkpointing import save_pipeline

    save_pipeline(FakePipeline("good"), tmp_path)
    with pytest.raises(KeyboardInterrupt):
        save_pipeline(FakePipeline("half", crash=True), tmp_path)
    assert read_index(tmp_path) == index("good")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").read_text() == "good"
    save_pipeline(FakePipeline("again"), tmp_path)  # the leftover temp folder does not get in the way
    assert read_index(tmp_path) == index("again") and not (tmp_path / ".pipeline.tmp").exists()


def test_a_kill_during_rotation_never_leaves_a_half_deleted_checkpoint_under_its_name(tmp_path, monkeypatch):
    from diffusers_curriculum import checkpointing
    from diffusers_curriculum.checkpointing import clean_leftovers

    save_checkpoint(FakeAccelerator(), tmp_path, 1)
    real_rmtree = checkpointing.shutil.rmtree

    def killed_half_way(path, *args, **kwargs):
        if Path(path).name == ".checkpoint-1.deleting" and Path(path).exists():
            (Path(path) / "model.safetensors").unlink()  # some files went, then the kill
            raise KeyboardInterrupt("killed while rotating")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpointing.shutil, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(FakeAccelerator(), tmp_path, 2, total_limit=1)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]  # the half-deleted one is not listed
    assert clean_leftovers(tmp_path) == [".checkpoint-1.deleting"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]


def test_clean_leftovers_restores_a_folder_whose_replacement_never_arrived(tmp_path):
    from diffusers_curriculum.checkpointing import clean_leftovers

    (tmp_path / ".checkpoint-3.old").mkdir()  # killed between the two renames of a re-save of step 3
    (tmp_path / ".checkpoint-3.tmp").mkdir()
    (tmp_path / ".pipeline.tmp").mkdir()
    (tmp_path / ".model_index.json.tmp").write_text("{")
    (tmp_path / ".write-test-123").write_text("ok")
    (tmp_path / ".unet.old").mkdir()
    (tmp_path / "unet").mkdir()  # its replacement did arrive: the old one goes
    clean_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "unet"]


def test_check_writable_leaves_no_probe_when_the_disk_is_full(tmp_path, monkeypatch):
    import builtins

    from diffusers_curriculum import checkpointing

    real_open = builtins.open

    class FullDisk:
        def __init__(self, path):
            self.file = real_open(path, "w")  # the file is created; writing it fails

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpointing, "open", lambda path, mode="r": FullDisk(path), raising=False)
    with pytest.raises(UsageError, match="not writable \\(No space left on device\\)"):
        checkpointing.check_writable(str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_run_error_is_one_line_after_a_progress_bar_with_exit_status_1(capsys):
    from tqdm.auto import tqdm

    from diffusers_curriculum.errors import RunError, exits_on_usage_error

    @exits_on_usage_error
    def main():
        bar = tqdm(total=10, desc="Steps")
        bar.update(3)
        raise RunError("checkpoint-4 could not be written; checkpoint-2 is intact")

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.splitlines()[-1] == "error: checkpoint-4 could not be written; checkpoint-2 is intact"
