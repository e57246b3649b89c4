"""Loads saved pipelines the way a user who never installed diffusers-curriculum does.

    python tests/portable_probe.py SPEC.json OUT_DIR

Run as a script it first blocks the package (``import diffusers_curriculum`` raises ImportError), then for every
kind in the spec loads the folder with the stock call the README gives, samples 2 steps with a seeded generator
(``OUT_DIR/<kind>.npy``), and runs each model card's loading snippet. It prints a JSON report. The test imports
:func:`load_stock` and :func:`sample` to load the same folders with the package imported.
"""

import json
import sys
import traceback
from pathlib import Path

TEXT_TO_IMAGE = ("text_to_image", "text_to_image_tdc", "lora", "sdxl", "sdxl_lora", "sdxl_tdc", "sd3", "sd3_lora", "sd3_tdc")
LORA = ("lora", "sdxl_lora", "sd3_lora")
# Kinds trained without T5: loaded as diffusers documents for SD3 without it.
WITHOUT_T5 = ("sd3_tdc",)
# Kinds whose folders carry code of their own: the README's call adds trust_remote_code=True for them only.
REMOTE_CODE = ("tdc", "tdc_pruned", "class_conditional", "class_conditional_tdc", "text_to_image_tdc", "sdxl_tdc",
               "class_conditional_flow", "tdc_flow", "tdc_flow_pruned", "sd3_tdc")


def load_stock(kind: str, folder: str, base: str = None):
    """The README's call for ``kind``."""
    from diffusers import DiffusionPipeline

    without_t5 = {"text_encoder_3": None, "tokenizer_3": None} if kind in WITHOUT_T5 else {}
    if kind in LORA:  # the base's own pipeline class (StableDiffusion[XL|3]Pipeline), then the adapters
        pipeline = DiffusionPipeline.from_pretrained(base)
        pipeline.load_lora_weights(folder)
    elif kind in REMOTE_CODE:
        pipeline = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, **without_t5)
    else:
        pipeline = DiffusionPipeline.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sample(kind: str, pipeline):
    """Two denoising steps from a seeded generator, as a float array."""
    import torch

    generator = torch.Generator().manual_seed(0)
    common = dict(num_inference_steps=2, generator=generator, output_type="np")
    if kind in TEXT_TO_IMAGE:
        return pipeline("a photo of a bag", **common).images
    if kind.startswith("class_conditional"):
        return pipeline(class_labels=[1, 7], guidance_scale=2.0, **common).images
    return pipeline(batch_size=2, **common).images


def main(spec_path: str, out_dir: str) -> None:
    sys.modules["diffusers_curriculum"] = None  # the user never installed it
    import numpy as np

    spec = json.loads(Path(spec_path).read_text())
    report = {"types": {}, "snippets": {}, "schedulers": {}}
    for kind, entry in spec.items():
        pipeline = load_stock(kind, entry["folder"], entry.get("base"))
        denoiser = pipeline.transformer if hasattr(pipeline, "transformer") else pipeline.unet
        report["types"][kind] = [type(pipeline).__name__, type(denoiser).__name__, type(denoiser).__module__]
        report["schedulers"][kind] = type(pipeline.scheduler).__name__
        np.save(Path(out_dir) / f"{kind}.npy", sample(kind, pipeline))
    for kind, entry in spec.items():
        try:
            exec(compile(entry["snippet"], f"{kind}/README.md", "exec"), {"__name__": "__snippet__"})
            report["snippets"][kind] = "ok"
        except Exception:
            report["snippets"][kind] = traceback.format_exc(limit=3)
    report["package_modules"] = sorted(m for m, mod in sys.modules.items() if m.startswith("diffusers_curriculum") and mod is not None)
    print(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
