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

import torch

from .errors import RunError, UsageError, describe_exception
from .export import REGIME_FILE, make_portable, read_json, write_json, write_training_regime

_NAME = re.compile(r"^checkpoint-(\d+)$")
RUN_RECORD = "run.json"  # in a checkpoint: the flags a resume must match
CARD_FILE = "README.md"  # the model card: the last file a finished run writes before it pushes
# What marks a folder as a finished run: a pipeline's index, a LoRA run's weights, the regime record.
FINISHED_MARKERS = ("model_index.json", "pytorch_lora_weights.safetensors", REGIME_FILE)


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


def check_resume(path: Path, record: Dict[str, Any], regime=None) -> None:
    """Compares the run record a checkpoint was written with (``run.json``) with this run's, before any weights
    load, so a mismatch reads as the flag that differs, not as ``Error(s) in loading state_dict``. ``regime``
    checks the regime's axes field by field; ``record``'s other fields (the script's task, the adapter) must
    be equal. Checkpoints written before the record existed pass (the regime state checks its axes on load)."""
    saved = read_json(Path(path) / RUN_RECORD)
    if saved is None:
        return
    for field, value in record.items():
        if field in ("regime", "global_step") or saved.get(field, value) == value:
            continue
        raise UsageError(f"--resume_from_checkpoint {path}: written by a run with {field} = {saved.get(field)}, this "
                         f"run has {value}; resume with the flags the checkpoint was written with")
    if regime is not None and "regime" in saved:
        regime.check_axes(saved["regime"])


def load_checkpoint(accelerator, path: Path) -> int:
    """``accelerator.load_state(path)``; returns the global step. A corrupt checkpoint is a UsageError (including
    a damaged RNG state, which accelerate would only log and skip: the resumed run would not be exact)."""
    step = checkpoint_step(path)
    for rng_file in sorted(Path(path).glob("random_states_*.pkl")):
        try:
            torch.load(rng_file, weights_only=False)
        except Exception as e:
            raise UsageError(f"--resume_from_checkpoint {path}: {rng_file.name} is damaged ({describe_exception(e)}); "
                             "resume from an earlier checkpoint") from None
    try:
        accelerator.load_state(str(path))
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"--resume_from_checkpoint {path}: cannot load it ({describe_exception(e)})") from None
    return step


def save_checkpoint(accelerator, output_dir: str, global_step: int, total_limit: Optional[int] = None,
                    record: Optional[Dict[str, Any]] = None) -> Path:
    """Writes ``checkpoint-<global_step>`` atomically on every rank (with ``record``, the run's flags that a
    resume must match, as ``run.json``), then rotates on the main process. A failed write (full disk, lost
    permission) removes the partial folder and raises a one-line :class:`RunError` naming the newest intact
    checkpoint."""
    final = Path(output_dir) / f"checkpoint-{global_step}"
    tmp = Path(output_dir) / f".checkpoint-{global_step}.tmp"
    previous = [p for p in list_checkpoints(output_dir) if p != final]
    try:
        if accelerator.is_main_process:  # a leftover from an interrupted save is incomplete: start clean
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)  # every rank writes its RNG state into it
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if record is not None:
                write_json(tmp / RUN_RECORD, {**record, "global_step": global_step})
            _fsync_tree(tmp)
            move_into_place(tmp, final)  # re-saving a step (e.g. after a resume) swaps the folder
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        intact = f"{previous[-1].name} is intact" if previous else "there is no earlier checkpoint"
        raise RunError(f"checkpoint-{global_step} could not be written to {output_dir} ({describe_exception(e)}); "
                       f"{intact} and the partial folder was removed") from None
    if accelerator.is_main_process and total_limit is not None:
        for stale in list_checkpoints(output_dir)[:-total_limit]:
            remove_tree(stale)
    accelerator.wait_for_everyone()
    return final


def remove_tree(path: Path) -> None:
    """Deletes a folder so that a kill half-way never leaves part of it under its complete-looking name: it is
    renamed aside (``.<name>.deleting``) first; :func:`clean_leftovers` finishes an interrupted delete."""
    path = Path(path)
    doomed = path.with_name(f".{path.name}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed)


_LEFTOVER = re.compile(r"^\.(.+)\.(tmp|old|deleting)$|^\.write-test-\d+$")


def clean_leftovers(output_dir: str) -> List[str]:
    """What an interrupted save leaves in ``output_dir``: temp folders and files (``.checkpoint-N.tmp``,
    ``.pipeline.tmp``, ``.x.json.tmp``, ``.write-test-*``) are removed, half-finished deletes finished, and a
    ``.<name>.old`` whose replacement never arrived is renamed back. Returns the names it acted on. Call on the
    main process before a run writes anything."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    acted = []
    for entry in sorted(root.iterdir()):
        match = _LEFTOVER.match(entry.name)
        if match is None:
            continue
        original = root / match.group(1) if match.group(1) else None
        if match.group(2) == "old" and original is not None and not original.exists():
            os.replace(entry, original)  # killed between the two renames of move_into_place
        elif entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        acted.append(entry.name)
    return acted


def start_over(output_dir: str) -> List[str]:
    """``--overwrite_output_dir`` on a fresh start: the earlier run's checkpoints go (else rotation would count
    them as the newest and ``latest`` would resume them), and so does its ``model_index.json`` / record, so the
    folder no longer claims a finished run. Returns the names removed."""
    removed = []
    for checkpoint in list_checkpoints(output_dir):
        remove_tree(checkpoint)
        removed.append(checkpoint.name)
    for name in FINISHED_MARKERS:
        path = Path(output_dir) / name
        if path.is_file():
            path.unlink()
            removed.append(name)
    return removed


def check_fresh_start(output_dir: str, overwrite: bool, resume_from_checkpoint: Optional[str], done_file: str) -> None:
    """A run that neither resumes nor overwrites must not start in a folder holding another run's work."""
    if overwrite or resume_from_checkpoint is not None:
        return
    if os.path.exists(os.path.join(output_dir, done_file)):
        raise UsageError(f"--output_dir {output_dir} already holds a finished run; pass --overwrite_output_dir or --resume_from_checkpoint")
    checkpoints = list_checkpoints(output_dir)
    if checkpoints:
        raise UsageError(f"--output_dir {output_dir} holds checkpoints of an earlier run ({checkpoints[-1].name}); pass "
                         "--resume_from_checkpoint latest to continue it or --overwrite_output_dir to start over")


def finished_at(output_dir: str, done_file: str) -> Optional[int]:
    """The step a complete saved result in ``output_dir`` was trained to (``trained_steps`` of its
    ``training_regime.json``), or ``None``. Complete: ``done_file`` is there and the model card, which a run writes
    last, is not older than it (an older card belongs to an earlier finish: the run died before writing its own)."""
    root = Path(output_dir)
    record = read_json(root / REGIME_FILE)
    done, card = root / done_file, root / CARD_FILE
    if record is None or not done.exists() or not card.exists() or card.stat().st_mtime_ns < done.stat().st_mtime_ns:
        return None
    return record.get("trained_steps")


def check_writable(output_dir: str) -> None:
    """Creates ``output_dir`` and writes a probe file there, so a bad path fails before training."""
    probe = os.path.join(output_dir, f".write-test-{os.getpid()}")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
    except OSError as e:
        raise UsageError(f"--output_dir {output_dir} is not writable ({e.strerror})") from None
    finally:
        if os.path.exists(probe):
            os.remove(probe)


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
