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
