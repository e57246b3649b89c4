"""Saved pipelines that load with stock diffusers, and the training record that travels with them.

What a script saves is for people who do not have this package:

* parts diffusers has are saved as its own classes (``DDPMPipeline``, ``StableDiffusionPipeline``,
  ``DDPMScheduler`` / ``DDIMScheduler``): ``DiffusionPipeline.from_pretrained(path_or_repo_id)`` loads them;
* parts it has not (the timestep-routed experts, the class-conditional pipeline) ship their code: the module
  file from :mod:`diffusers_curriculum.portable` is copied into the component's folder (or the pipeline's
  root) and ``model_index.json`` names it the way diffusers' custom-code route expects, so
  ``DiffusionPipeline.from_pretrained(path_or_repo_id, trust_remote_code=True)`` loads them;
* how the model was trained (everything ``describe()`` of the regime returns) is ``training_regime.json`` at
  the pipeline's root; :func:`read_training_regime` reads it back from a folder or a Hub repo.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Union


from .errors import UsageError
from .noise import as_process

REGIME_FILE = "training_regime.json"
INDEX_FILE = "model_index.json"
PORTABLE_DIR = Path(__file__).resolve().parent / "portable"
# Class name -> the self-contained module (in portable/) that defines it and ships with a saved pipeline.
PORTABLE_COMPONENTS = {"TimestepRoutedExperts": "timestep_routed_experts"}
PORTABLE_PIPELINES = {"ClassConditionalPipeline": "class_conditional_pipeline"}
# Libraries whose classes a stock diffusers install resolves by name.
STOCK_LIBRARIES = ("diffusers", "transformers")


def stock_scheduler(noise_scheduler, sampler: str = "ddpm"):
    """The scheduler to ship: ``noise_scheduler``'s config as a stock ``DDPMScheduler`` or ``DDIMScheduler``; a
    rectified flow's ``FlowMatchEulerDiscreteScheduler`` as it is (:meth:`~diffusers_curriculum.noise.NoiseProcess.pipeline_scheduler`).

    A ``training_regime`` entry in the config (left by a base pipeline saved in the old layout) is dropped:
    the record of *this* run is ``training_regime.json``.
    """
    process = as_process(noise_scheduler)
    if process.name != "ddpm":  # a flow pipeline ships its own FlowMatchEulerDiscreteScheduler
        return process.pipeline_scheduler()
    return process.pipeline_scheduler(sampler)


def _portable_module(library: Optional[str], class_name: Optional[str]) -> Optional[str]:
    """The portable module of a ``model_index.json`` entry, or None for a stock class."""
    if library is None or library in STOCK_LIBRARIES:
        return None
    return PORTABLE_COMPONENTS.get(class_name)


def make_portable(folder: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Rewrites a saved pipeline folder so that stock diffusers can load it; returns the new index.

    Each component whose class lives in :mod:`diffusers_curriculum.portable` (diffusers records it by module
    path, e.g. ``["diffusers_curriculum.portable.timestep_routed_experts", "TimestepRoutedExperts"]``) gets
    the module file in its folder and the entry ``["timestep_routed_experts", "TimestepRoutedExperts"]``; a
    portable pipeline class gets its file at the root and ``_class_name: [module, class]``.
    """
    folder = Path(folder)
    index = json.loads((folder / INDEX_FILE).read_text())
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2:
            continue
        module = _portable_module(*entry)
        if module is not None:
            shutil.copyfile(PORTABLE_DIR / f"{module}.py", folder / name / f"{module}.py")
            index[name] = [module, entry[1]]
    class_name = index["_class_name"]
    class_name = class_name[1] if isinstance(class_name, list) else class_name
    if class_name in PORTABLE_PIPELINES:
        module = PORTABLE_PIPELINES[class_name]
        shutil.copyfile(PORTABLE_DIR / f"{module}.py", folder / f"{module}.py")
        index["_class_name"] = [module, class_name]
    write_json(folder / INDEX_FILE, index)
    return index


def needs_remote_code(folder: Union[str, os.PathLike]) -> bool:
    """Whether loading the saved pipeline in ``folder`` takes ``trust_remote_code=True``."""
    index = json.loads((Path(folder) / INDEX_FILE).read_text())
    return isinstance(index["_class_name"], list) or any(
        isinstance(v, list) and len(v) == 2 and v[1] in PORTABLE_COMPONENTS for k, v in index.items() if not k.startswith("_")
    )


def write_json(path: Union[str, os.PathLike], value: Any) -> None:
    """Writes ``value`` as JSON through a temp file, so the file is either the old or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Union[str, os.PathLike]) -> Optional[Any]:
    """The JSON value in ``path``, or ``None`` when there is no such file; a damaged file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise UsageError(f"{path} is damaged ({type(e).__name__}: {e}); delete it or restore it") from None


def write_training_regime(folder: Union[str, os.PathLike], record: Dict[str, Any]) -> Path:
    """Writes the regime record (``regime.describe()``) to ``<folder>/training_regime.json``."""
    path = Path(folder) / REGIME_FILE
    write_json(path, record)
    return path


def read_training_regime(path_or_repo_id: Union[str, os.PathLike], revision: Optional[str] = None,
                         token: Optional[str] = None) -> Dict[str, Any]:
    """How a saved pipeline (or LoRA folder) was trained: its ``training_regime.json``, from a local folder or
    a Hub repo. Pipelines saved in the old layout kept the record in ``scheduler/scheduler_config.json``; it
    is read from there when the file is missing.

        >>> read_training_regime("fmnist-ddpm")["name"]
        'uniform'
    """
    def fetch(filename: str) -> Optional[str]:
        local = Path(path_or_repo_id) / filename
        if local.is_file():
            return str(local)
        if os.path.isdir(path_or_repo_id):
            return None
        from huggingface_hub import errors, hf_hub_download

        # The repo exists but lacks the file (offline and not cached is another error, raised as it is).
        missing = getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)
        try:
            return hf_hub_download(str(path_or_repo_id), filename, revision=revision, token=token)
        except missing:
            return None

    path = fetch(REGIME_FILE)
    if path is not None:
        return json.loads(Path(path).read_text())
    path = fetch("scheduler/scheduler_config.json")
    record = json.loads(Path(path).read_text()).get("training_regime") if path is not None else None
    if record is None:
        raise FileNotFoundError(f"{path_or_repo_id} holds no {REGIME_FILE}: it was not saved by diffusers-curriculum")
    return record
