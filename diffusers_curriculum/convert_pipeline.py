"""Rewrites a pipeline saved in the old layout so that stock diffusers loads it.

    python -m diffusers_curriculum.convert_pipeline OLD NEW

Up to commit e71fd58 the scripts saved ``RegimeDDPMScheduler`` / ``RegimeDDIMScheduler`` (recorded as
``["diffusers_curriculum.schedulers", ...]``), the experts as ``["diffusers_curriculum.experts", ...]`` and the
class-conditional pipeline as ``_class_name: ClassConditionalPipeline`` -- names only an interpreter that
imported this package resolves. The copy in ``NEW`` names stock schedulers, carries the code of its custom
parts, and holds the regime record in ``training_regime.json``: it loads with
``DiffusionPipeline.from_pretrained(NEW, trust_remote_code=True)`` (``trust_remote_code`` only where a custom
part is present). ``OLD`` is not changed; the model card is copied as it is (its snippet may still import the
package).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from .errors import UsageError, exits_on_usage_error
from .export import INDEX_FILE, REGIME_FILE, make_portable, needs_remote_code, write_json, write_training_regime
from .schedulers import LEGACY_SCHEDULERS

# Training state that lives next to a pipeline in an --output_dir; not part of the pipeline.
NOT_COPIED = shutil.ignore_patterns("checkpoint-*", ".checkpoint-*", "logs", "*.tmp", ".*.old")


def convert_pipeline(old: os.PathLike, new: os.PathLike) -> Path:
    """Writes the portable copy of the pipeline folder ``old`` to ``new`` (which must not exist yet)."""
    old, new = Path(old), Path(new)
    if not (old / INDEX_FILE).is_file():
        raise UsageError(f"{old} holds no {INDEX_FILE}: not a saved pipeline")
    if new.exists():
        raise UsageError(f"{new} already exists; give a new folder (the converter never overwrites)")
    tmp = new.with_name(f".{new.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(old, tmp, ignore=NOT_COPIED)

    index = json.loads((tmp / INDEX_FILE).read_text())
    record = None
    for name, entry in index.items():
        if isinstance(entry, list) and len(entry) == 2 and entry[1] in LEGACY_SCHEDULERS:
            stock = LEGACY_SCHEDULERS[entry[1]]
            config_path = tmp / name / "scheduler_config.json"
            config = json.loads(config_path.read_text())
            record = config.pop("training_regime", None) or record
            write_json(config_path, {**config, "_class_name": stock})
            index[name] = ["diffusers", stock]
    write_json(tmp / INDEX_FILE, index)
    make_portable(tmp)
    if record is not None and not (tmp / REGIME_FILE).exists():
        write_training_regime(tmp, record)
    os.replace(tmp, new)
    return new


@exits_on_usage_error
def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description="Rewrite a pipeline saved in the old layout so that stock diffusers loads it.")
    parser.add_argument("old", help="The pipeline folder saved in the old layout (left unchanged).")
    parser.add_argument("new", help="Where to write the portable copy (must not exist).")
    new = convert_pipeline(**vars(parser.parse_args(argv)))
    flag = ", trust_remote_code=True" if needs_remote_code(new) else ""
    print(f"Wrote {new}: load it with DiffusionPipeline.from_pretrained({str(new)!r}{flag})")
    return new


if __name__ == "__main__":
    main()
