"""What a text-to-image batch conditions on, per Stable Diffusion family: the text encoders, how a caption becomes
the UNet's conditioning, and the stock pipeline a run ships.

``family_of(path)`` reads the base's ``model_index.json``. Supported: Stable Diffusion 1.x/2.x
(``StableDiffusionPipeline``: one CLIP text encoder) and SDXL (``StableDiffusionXLPipeline``: two CLIP text encoders,
the penultimate hidden states of both concatenated, the second's pooled projection, and each image's original size,
crop top-left and target size as ``time_ids``, as diffusers' ``train_text_to_image_sdxl.py`` conditions it).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .errors import UsageError, describe_exception

SUPPORTED = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}
NOT_YET = {
    "StableDiffusion3Pipeline": "SD3/SD3.5 train with flow matching, which this package does not support yet",
    "FluxPipeline": "Flux trains with flow matching, which this package does not support yet",
}


def family_of(path: str, revision: Optional[str] = None) -> str:
    """``sd`` or ``sdxl`` for the pipeline at ``path`` (its ``model_index.json``); a one-line error otherwise."""
    from diffusers import DiffusionPipeline

    try:
        name = DiffusionPipeline.load_config(path, revision=revision)["_class_name"]
    except Exception as e:
        raise UsageError(f"--pretrained_model_name_or_path {path}: cannot load a Stable Diffusion pipeline "
                         f"({describe_exception(e)})") from None
    if name in SUPPORTED:
        return SUPPORTED[name]
    why = NOT_YET.get(name, "it is not a Stable Diffusion pipeline")
    raise UsageError(f"--pretrained_model_name_or_path {path} is a {name}: {why}; supported: Stable Diffusion 1.x/2.x "
                     f"(StableDiffusionPipeline) and SDXL (StableDiffusionXLPipeline)")


class StableDiffusionText:
    """SD 1.x/2.x: one CLIP tokenizer and text encoder; the UNet gets the last hidden states."""

    family, pipeline_class_name = "sd", "StableDiffusionPipeline"
    label = "Stable Diffusion"

    def __init__(self, path: str, revision: Optional[str] = None, variant: Optional[str] = None):
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)]
        self.text_encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=variant, revision=revision)]

    @property
    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def tokenize(self, captions: Sequence[str]) -> List[torch.Tensor]:
        return [t(list(captions), max_length=t.model_max_length, padding="max_length", truncation=True,
                  return_tensors="pt").input_ids for t in self.tokenizers]

    def encode(self, input_ids: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(the UNet's ``encoder_hidden_states``, the pooled text embedding or ``None``) of tokenized captions."""
        encoder = self.text_encoders[0]
        return encoder(input_ids[0].to(encoder.device), return_dict=False)[0], None

    def unet_kwargs(self, pooled: Optional[torch.Tensor], batch: Dict[str, Any], resolution: int) -> Dict[str, Any]:
        return {}

    def components(self) -> Dict[str, Any]:
        return {"tokenizer": self.tokenizers[0], "text_encoder": self.text_encoders[0], "safety_checker": None,
                "feature_extractor": None, "requires_safety_checker": False}

    def pipeline(self, unet, vae, scheduler):
        pipeline = self.pipeline_class(vae=vae, unet=unet, scheduler=scheduler, **self.components())
        pipeline.set_progress_bar_config(disable=True)
        return pipeline


class StableDiffusionXLText(StableDiffusionText):
    """SDXL: two CLIP tokenizers and text encoders (the second with a projection)."""

    family, pipeline_class_name = "sdxl", "StableDiffusionXLPipeline"
    label = "Stable Diffusion XL"

    def __init__(self, path: str, revision: Optional[str] = None, variant: Optional[str] = None):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        self.tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder=f, revision=revision) for f in ("tokenizer", "tokenizer_2")]
        self.text_encoders = [
            CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=variant, revision=revision),
            CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", variant=variant, revision=revision),
        ]

    def encode(self, input_ids):
        """diffusers' SDXL ``encode_prompt``: both encoders' penultimate hidden states side by side, and the second
        encoder's pooled, projected embedding."""
        hidden, pooled = [], None
        for encoder, ids in zip(self.text_encoders, input_ids):
            output = encoder(ids.to(encoder.device), output_hidden_states=True, return_dict=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0]  # the last encoder's text_embeds
        return torch.cat(hidden, dim=-1), pooled

    def unet_kwargs(self, pooled, batch, resolution):
        """``added_cond_kwargs``: the pooled text and (original size, crop top-left, target size) per image."""
        target = torch.tensor([resolution, resolution]).expand(len(batch["original_size"]), 2)
        time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], target], dim=1).to(pooled.device, pooled.dtype)
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    def components(self):
        return {"tokenizer": self.tokenizers[0], "tokenizer_2": self.tokenizers[1], "text_encoder": self.text_encoders[0],
                "text_encoder_2": self.text_encoders[1], "add_watermarker": False}


FAMILY_CLASSES = {"sd": StableDiffusionText, "sdxl": StableDiffusionXLText}


def load_text_conditioning(path: str, revision: Optional[str] = None, variant: Optional[str] = None) -> StableDiffusionText:
    """The family's text side for the base at ``path`` (one-line error when it cannot load)."""
    family = family_of(path, revision)
    try:
        return FAMILY_CLASSES[family](path, revision, variant)
    except Exception as e:
        raise UsageError(f"--pretrained_model_name_or_path {path}: cannot load its text encoders ({describe_exception(e)})") from None
