"""Model cards and pushes to the Hugging Face Hub.

Cards render the templates in ``model_cards/`` with ``huggingface_hub.ModelCard.from_template`` and follow
the Hub's conventions (``library_name``, ``pipeline_tag``, ``base_model`` and its license, tags, a loading
snippet that names the repo). Pushing always follows a complete local save: a failed push leaves a complete,
loadable local folder and ends the script with a one-line error.
"""

from __future__ import annotations

import os
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional

from huggingface_hub import ModelCard, ModelCardData, create_repo, get_token, hf_hub_download, upload_folder

from .errors import UsageError, describe_exception
from .export import needs_remote_code
from .regimes.words import regime_in_words

STAGING_DIR = ".hub-staging"  # --push_checkpoints: hard-linked snapshots of the checkpoints being uploaded
# Never uploaded: training state and logs that live next to the pipeline in --output_dir.
PUSH_IGNORE_PATTERNS = [
    "checkpoint-*/**", ".checkpoint-*/**", f"{STAGING_DIR}/**", "logs/**", "samples/step_*", "*.tmp", "*.tmp/**", ".*.old/**", ".write-test-*",
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


def training_facts(num_examples: int, data: str, trained_steps: int, total_batch_size: int, num_parameters: int,
                   trainable_parameters: Optional[int] = None) -> Dict[str, Any]:
    """What a card states about the run, computed from the run: ``data`` describes the ``num_examples`` training
    examples in words (:func:`diffusers_curriculum.data.describe_data`); the samples seen and the passes over the
    data follow from the steps and the total batch (processes × batch × accumulation)."""
    seen = trained_steps * total_batch_size
    return {"num_examples": num_examples, "data": data, "trained_steps": trained_steps, "total_batch_size": total_batch_size,
            "samples_seen": seen, "epochs": seen / num_examples, "num_parameters": num_parameters,
            "trainable_parameters": trainable_parameters}


def training_sections(regime: Dict[str, Any], settings: Dict[str, Any], facts: Optional[Dict[str, Any]], evaluated: bool) -> str:
    """The card's training data, regime, settings, evaluation and limitations sections (markdown), shared by every
    template; each sentence is a fact of the run (``facts`` from :func:`training_facts`; ``None`` leaves out what
    only they tell)."""
    lines = []
    if facts is not None:
        lines += ["## Training data", "",
                  f"Trained on {facts['data']}. {facts['trained_steps']:,} optimizer steps at a total batch of "
                  f"{facts['total_batch_size']} saw {facts['samples_seen']:,} examples, {facts['epochs']:.3g} passes over the "
                  f"data.", ""]
    lines += ["## Training regime", ""]
    lines += [f"- {line}" for line in regime_in_words(regime, regime.get("trained_steps", facts and facts["trained_steps"]))]
    lines += ["", "The full record (every axis, the clusters' boundaries, the curriculum's stage history) is in "
              "`training_regime.json`.", "", "## Training settings", ""]
    if facts is not None:
        size = f"{facts['num_parameters'] / 1e6:.2f}M parameters"
        if facts.get("trainable_parameters") is not None:
            size += f", of which {facts['trainable_parameters'] / 1e6:.3g}M trained"
        lines += [f"Model size: {size}.", ""]
    lines += ["| setting | value |", "| --- | --- |"]
    lines += [f"| {key} | `{value}` |" for key, value in settings.items()]
    lines += ["", "## Evaluation", "",
              ("No metric (such as FID) was computed for this model; the samples above, from the final weights, are the "
               "only evaluation." if evaluated else "No metric (such as FID) and no samples were produced for this model."),
              "", "## Limitations", ""]
    if facts is not None:
        lines.append(f"- Trained for {facts['trained_steps']:,} steps on {facts['num_examples']:,} examples: judge the model "
                     f"by its samples, not by what its architecture reaches elsewhere.")
    lines += ["- The training regime changes which noise levels were trained and how their losses were weighted; its "
              "benefit was measured by diffusers-curriculum on small Fashion-MNIST benchmarks, not on this model.", ""]
    return "\n".join(lines)


def write_model_card(
    output_dir: str,
    template: str,
    repo_id: str,
    regime: Dict[str, Any],
    settings: Dict[str, Any],
    pipeline_class: str,
    facts: Optional[Dict[str, Any]] = None,
    pipeline_tag: Optional[str] = None,
    dataset: Optional[str] = None,
    validation_image: Optional[str] = None,
    tags: Iterable[str] = (),
    base_model: Optional[str] = None,
    license: Optional[str] = None,
    widget: Optional[list] = None,
    **template_kwargs: Any,
) -> Path:
    """Renders ``model_cards/<template>.md`` to ``<output_dir>/README.md``.

    The card's loading snippet names ``repo_id`` and passes ``trust_remote_code=True`` only when the saved
    pipeline in ``output_dir`` carries its own code. ``validation_image`` is a path relative to
    ``output_dir`` (or ``None`` when no samples exist); ``facts`` come from :func:`training_facts`; ``widget``
    is the Hub's sample gallery (``[{"text": prompt, "output": {"url": path}}]``; default: the validation image).
    Values are written as given: pass no tokens. ``license`` is the base model's for fine-tunes; a model trained
    from scratch gets none (the weights are the user's to license).
    """
    if widget is None and validation_image:
        widget = [{"output": {"url": validation_image}}]
    card_data = ModelCardData(
        license=license,
        library_name="diffusers",
        pipeline_tag=pipeline_tag,
        tags=["diffusers", "diffusers-training", "diffusers-curriculum", str(regime.get("name", "unknown")), *tags],
        datasets=[dataset] if dataset and not os.path.isabs(dataset) else None,
        base_model=base_model,
        widget=widget or None,
    )
    evaluated = bool(validation_image or template_kwargs.get("validation"))
    index = Path(output_dir) / "model_index.json"
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path(template)),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        regime=regime,
        settings=settings,
        pipeline_class=pipeline_class,
        remote_code=index.exists() and needs_remote_code(output_dir),
        dataset=dataset,
        validation_image=validation_image,
        base_model=base_model,
        training_sections=training_sections(regime, settings, facts, evaluated),
        facts=facts,
        **template_kwargs,
    )
    path = Path(output_dir) / "README.md"
    tmp = path.with_name("README.md.tmp")
    card.save(tmp)
    os.replace(tmp, path)
    return path


def base_model_id(name_or_path: str) -> Optional[str]:
    """The Hub id of the model a run fine-tuned: the id itself, or for a local folder the repo it came from
    (a ``huggingface_hub`` cache snapshot ``models--<org>--<name>/snapshots/<rev>``, or a ``git clone`` of a
    huggingface.co repo); ``None`` for a folder of unknown origin."""
    path = Path(name_or_path)
    if not path.is_dir():
        return str(name_or_path)
    path = path.resolve()
    for part in path.parts:
        if part.startswith("models--") and "snapshots" in path.parts:
            return part[len("models--"):].replace("--", "/")
    git_config = path / ".git" / "config"
    if git_config.is_file():
        match = re.search(r"url\s*=\s*https://huggingface\.co/([\w.-]+/[\w.-]+?)(?:\.git)?\s*$", git_config.read_text(), re.M)
        if match:
            return match.group(1)
    return None


def base_model_license(name_or_path: str, repo_id: Optional[str]) -> Optional[str]:
    """The ``license`` of the base model's card: the local folder's ``README.md``, else the Hub repo's card
    (downloaded, or from the cache when offline); ``None`` when no card can be read."""
    card_path = Path(name_or_path) / "README.md"
    if not card_path.is_file():
        if repo_id is None:
            return None
        try:
            card_path = Path(hf_hub_download(repo_id, "README.md"))
        except Exception:  # offline, no such repo, no card: the license is unknown, not an error
            return None
    try:
        return ModelCard.load(card_path).data.license
    except Exception:
        return None


def base_model_fields(name_or_path: str) -> Dict[str, Optional[str]]:
    """``base_model`` and ``license`` card fields for a run that fine-tuned ``name_or_path``."""
    repo_id = base_model_id(name_or_path)
    return {"base_model": repo_id, "license": base_model_license(name_or_path, repo_id)}


def resolve_hub_token(hub_token: Optional[str], flag: str = "--push_to_hub") -> str:
    """The token a push will use: ``--hub_token`` or the one saved by ``hf auth login`` (or ``HF_TOKEN``)."""
    token = hub_token or get_token()
    if not token:
        raise UsageError(f"{flag} needs a token: pass --hub_token or log in with `hf auth login`")
    return token


def push_folder(output_dir: str, repo_id: str, token: str, private: bool = False, commit_message: str = "End of training",
                write_card: Optional[Callable[[str], Any]] = None) -> str:
    """Creates (or reuses) ``repo_id`` and uploads ``output_dir`` minus checkpoints and logs; returns the
    namespaced id ``create_repo`` gave. ``write_card(repo_id)``, when given, rewrites the model card with that
    id before the upload, so the card's loading snippet names the repo it is in."""
    try:
        repo_id = create_repo(repo_id, exist_ok=True, private=private, token=token).repo_id
        if write_card is not None:
            write_card(repo_id)
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


def publish(output_dir: str, write_card: Optional[Callable[[str], Any]], push_to_hub: bool, hub_model_id: Optional[str] = None,
            token: Optional[str] = None, private: bool = False) -> str:
    """Writes the card for ``--hub_model_id`` (default: the output folder's name) and, with ``--push_to_hub``,
    pushes; the pushed card names the namespaced id the Hub gave. ``write_card=None`` keeps the card already in
    the folder (the re-run of a finished run retrying its push). Returns the repo id the card names.
    Raises :class:`HubPushError` when the push fails (the local folder stays complete)."""
    repo_id = hub_model_id or Path(output_dir).resolve().name
    if write_card is not None:
        write_card(repo_id)
    if push_to_hub:
        repo_id = push_folder(output_dir, repo_id, token, private=private, write_card=write_card)
    return repo_id


def publish_or_exit(write_card: Optional[Callable[[str], Any]], output_dir: str, push_to_hub: bool = False,
                    hub_model_id: Optional[str] = None, token: Optional[str] = None, private: bool = False) -> str:
    """A script's last step: :func:`publish` with its ``--output_dir --push_to_hub --hub_model_id
    --hub_private_repo`` (token resolved up front); a failed push prints one line and exits with status 1."""
    try:
        repo_id = publish(output_dir, write_card, push_to_hub, hub_model_id, token, private)
    except HubPushError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if push_to_hub:
        print(f"Pushed to https://huggingface.co/{repo_id}")
    return repo_id
