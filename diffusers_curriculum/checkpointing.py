"""Crash-safe ``accelerator.save_state`` checkpoints named ``checkpoint-<global step>``.

A checkpoint is written to a hidden ``.checkpoint-<step>.tmp`` folder and renamed into place only when
complete, so ``--resume_from_checkpoint latest`` never sees a half-written one. Rotation by
``--checkpoints_total_limit`` runs after the new checkpoint is in place and never removes the newest.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import UsageError, describe_exception
from .export import make_portable, write_training_regime

_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str) -> List[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: Path) -> int:
    match = _NAME.match(Path(path).name)
    if match is None:
        raise UsageError(f"--resume_from_checkpoint {path}: not a checkpoint-<step> folder")
    return int(match.group(1))


def resolve_resume_path(output_dir: str, resume_from_checkpoint: Optional[str]) -> Optional[Path]:
    """The checkpoint to resume from: ``None`` (fresh start), ``latest`` (newest complete one, or a fresh
    start when there is none, so re-running a pre-empted command just continues), or a path / a name in
    ``output_dir`` that must exist."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir() and (Path(output_dir) / resume_from_checkpoint).is_dir():
        path = Path(output_dir) / resume_from_checkpoint
    if not path.is_dir():
        raise UsageError(f"--resume_from_checkpoint {resume_from_checkpoint}: no checkpoint folder there")
    checkpoint_step(path)
    return path


def load_checkpoint(accelerator, path: Path) -> int:
    """``accelerator.load_state(path)``; returns the global step. A corrupt checkpoint is a UsageError."""
    step = checkpoint_step(path)
    try:
        accelerator.load_state(str(path))
    except Exception as e:
        raise UsageError(f"--resume_from_checkpoint {path}: cannot load it ({describe_exception(e)})") from None
    return step


def save_checkpoint(accelerator, output_dir: str, global_step: int, total_limit: Optional[int] = None) -> Path:
    """Writes ``checkpoint-<global_step>`` atomically on every rank, then rotates on the main process."""
    final = Path(output_dir) / f"checkpoint-{global_step}"
    tmp = Path(output_dir) / f".checkpoint-{global_step}.tmp"
    if accelerator.is_main_process:  # a leftover from an interrupted save is incomplete: start clean
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)  # every rank writes its RNG state into it
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(tmp)
        move_into_place(tmp, final)  # re-saving a step (e.g. after a resume) swaps the folder
        if total_limit is not None:
            for stale in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


def check_writable(output_dir: str) -> None:
    """Creates ``output_dir`` and writes a probe file there, so a bad path fails before training."""
    probe = os.path.join(output_dir, f".write-test-{os.getpid()}")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"--output_dir {output_dir} is not writable ({e.strerror})") from None


def _fsync_tree(root: Path) -> None:
    """Flushes every file below ``root`` to disk before it is renamed into place."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def save_pipeline(pipeline, output_dir: str, training_regime: Optional[Dict[str, Any]] = None) -> None:
    """``pipeline.save_pretrained(output_dir)`` that stock diffusers can load and a crash cannot leave half-written.

    The pipeline is saved to a hidden temp folder first and made portable there (custom parts carry their
    code, :func:`~diffusers_curriculum.export.make_portable`; the regime record goes to
    ``training_regime.json``); its entries then replace those in ``output_dir`` one rename at a time,
    ``model_index.json`` last, so a folder with ``model_index.json`` always holds a complete pipeline
    (checkpoints and other files in ``output_dir`` are not touched).
    """
    root = Path(output_dir)
    tmp = root / ".pipeline.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.save_pretrained(str(tmp))
    make_portable(tmp)
    if training_regime is not None:
        write_training_regime(tmp, training_regime)
    _fsync_tree(tmp)
    index = root / "model_index.json"
    if index.exists():
        index.unlink()  # from here until the last rename, the folder is not a pipeline
    entries = sorted(tmp.iterdir(), key=lambda p: p.name == "model_index.json")
    for entry in entries:
        move_into_place(entry, root / entry.name)
    tmp.rmdir()


def move_into_place(source: Path, target: Path) -> None:
    """Renames ``source`` to ``target``. An existing target folder is first renamed aside (a rename cannot
    replace a non-empty folder) and deleted only once the new one is in place, so there is never neither."""
    if target.is_dir() and source.is_dir():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old)
    else:
        os.replace(source, target)
