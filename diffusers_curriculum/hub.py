"""Model cards and pushes to the Hugging Face Hub.

Cards render the templates in ``model_cards/`` with ``huggingface_hub.ModelCard.from_template``. Pushing
always follows a complete local save: a failed push leaves the local folder as it was and ends the script
with a one-line error.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

from huggingface_hub import ModelCard, ModelCardData, create_repo, get_token, upload_folder

from .errors import UsageError, describe_exception

# Never uploaded: training state and logs that live next to the pipeline in --output_dir.
PUSH_IGNORE_PATTERNS = [
    "checkpoint-*/**", ".checkpoint-*/**", "logs/**", "samples/step_*", "*.tmp", "*.tmp/**", ".*.old/**", ".write-test-*",
]


class HubPushError(RuntimeError):
    """The push failed; the local save is complete and untouched."""


def template_path(name: str) -> Path:
    """Path of the card template ``model_cards/<name>.md``: shipped inside the installed package, or beside it
    in a source checkout used without installing (``PYTHONPATH=<checkout>``)."""
    try:
        return Path(str(resources.files("diffusers_curriculum.model_cards").joinpath(f"{name}.md")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "model_cards" / f"{name}.md"


def write_model_card(
    output_dir: str,
    template: str,
    repo_id: str,
    regime: Dict[str, Any],
    settings: Dict[str, Any],
    pipeline_class: str,
    dataset: Optional[str] = None,
    validation_image: Optional[str] = None,
    tags: Iterable[str] = (),
    base_model: Optional[str] = None,
    **template_kwargs: Any,
) -> Path:
    """Renders ``model_cards/<template>.md`` to ``<output_dir>/README.md``.

    ``validation_image`` is a path relative to ``output_dir`` (or ``None`` when no samples exist).
    Values are written as given: pass no tokens and no local paths.
    """
    card_data = ModelCardData(
        license="apache-2.0",
        library_name="diffusers",
        tags=["diffusers", "diffusers-curriculum", f"regime-{regime.get('name', 'unknown')}", *tags],
        datasets=[dataset] if dataset and not os.path.isabs(dataset) else None,
        base_model=base_model,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path(template)),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        regime=regime,
        settings=settings,
        pipeline_class=pipeline_class,
        dataset=dataset,
        validation_image=validation_image,
        base_model=base_model,
        **template_kwargs,
    )
    path = Path(output_dir) / "README.md"
    tmp = path.with_name("README.md.tmp")
    card.save(tmp)
    os.replace(tmp, path)
    return path


def resolve_hub_token(hub_token: Optional[str]) -> str:
    """The token a push will use: ``--hub_token`` or the one saved by ``hf auth login``."""
    token = hub_token or get_token()
    if not token:
        raise UsageError("--push_to_hub needs a token: pass --hub_token or log in with `hf auth login`")
    return token


def push_folder(output_dir: str, repo_id: str, token: str, private: bool = False, commit_message: str = "End of training") -> str:
    """Creates (or reuses) ``repo_id`` and uploads ``output_dir`` minus checkpoints and logs."""
    try:
        repo_id = create_repo(repo_id, exist_ok=True, private=private, token=token).repo_id
        upload_folder(
            repo_id=repo_id,
            folder_path=output_dir,
            commit_message=commit_message,
            ignore_patterns=PUSH_IGNORE_PATTERNS,
            token=token,
        )
    except Exception as e:
        raise HubPushError(
            f"push to {repo_id} failed ({describe_exception(e)}); the pipeline is saved in {output_dir}"
        ) from None
    return repo_id
