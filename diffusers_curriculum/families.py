"""What a text-to-image batch conditions on, per Stable Diffusion family: the denoiser (UNet or transformer), the
text encoders, how a caption becomes the denoiser's conditioning, and the stock pipeline a run ships.

``family_of(path)`` reads the base's ``model_index.json``. Supported:

* Stable Diffusion 1.x/2.x (``StableDiffusionPipeline``): one CLIP text encoder, a ``UNet2DConditionModel``.
* SDXL (``StableDiffusionXLPipeline``): two CLIP text encoders, the penultimate hidden states of both concatenated,
  the second's pooled projection, and each image's original size, crop top-left and target size as ``time_ids``,
  as diffusers' ``train_text_to_image_sdxl.py`` conditions it.
* SD3 / SD3.5 (``StableDiffusion3Pipeline``): an ``SD3Transformer2DModel`` trained by flow matching; two CLIP
  encoders (penultimate hidden states side by side, zero-padded to T5's width, and both pooled projections) and T5
  (its last hidden states after CLIP's along the sequence; zeros when T5 is dropped), as diffusers' SD3 pipeline
  and ``train_dreambooth_sd3.py`` encode a prompt.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .errors import UsageError, describe_exception
from .lora import UNET_TARGET_MODULES

SUPPORTED = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3"}
NOT_YET = {
    "FluxPipeline": "Flux is not supported yet (its transformer takes packed 2×2 latents, rotary image/text ids and a "
                    "guidance embedding, which the text-to-image step does not build)",
}
SUPPORTED_WORDS = ("Stable Diffusion 1.x/2.x (StableDiffusionPipeline), SDXL (StableDiffusionXLPipeline) and SD3/SD3.5 "
                   "(StableDiffusion3Pipeline)")


def family_of(path: str, revision: Optional[str] = None) -> str:
    """``sd``, ``sdxl`` or ``sd3`` for the pipeline at ``path`` (its ``model_index.json``); a one-line error otherwise."""
    from diffusers import DiffusionPipeline

    try:
        name = DiffusionPipeline.load_config(path, revision=revision)["_class_name"]
    except Exception as e:
        raise UsageError(f"--pretrained_model_name_or_path {path}: cannot load a Stable Diffusion pipeline "
                         f"({describe_exception(e)})") from None
    if name in SUPPORTED:
        return SUPPORTED[name]
    why = NOT_YET.get(name, "it is not a Stable Diffusion pipeline")
    raise UsageError(f"--pretrained_model_name_or_path {path} is a {name}: {why}; supported: {SUPPORTED_WORDS}")


class StableDiffusionText:
    """SD 1.x/2.x: one CLIP tokenizer and text encoder; the UNet gets the last hidden states."""

    family, pipeline_class_name = "sd", "StableDiffusionPipeline"
    label = "Stable Diffusion"
    # the denoiser: its pipeline component (and folder) and class
    denoiser_name, denoiser_class_name = "unet", "UNet2DConditionModel"
    lora_target_modules = UNET_TARGET_MODULES  # diffusers' train_text_to_image_lora.py's
    lora_peft_format = False  # LoRA files in diffusers' key format (SD3's scripts save peft's)

    def __init__(self, path: str, revision: Optional[str] = None, variant: Optional[str] = None, **options):
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

    def conditioning(self, pooled: Optional[torch.Tensor], batch: Dict[str, Any]) -> Dict[str, Any]:
        """The denoiser's keyword arguments beyond the text context (SDXL: pooled text, size and crop ids)."""
        return {}

    def predict(self, model, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, conditioning: Dict[str, Any]):
        """The denoiser's output for ``noisy`` latents at (fed) ``timesteps`` given the text ``context``."""
        return model(noisy, timesteps, context, return_dict=False, **conditioning)[0]

    def sampling_kwargs(self) -> Dict[str, Any]:
        """Extra pipeline-call arguments that make sampling see the text as training did."""
        return {}

    def loading_kwargs(self) -> Dict[str, Any]:
        """Extra ``from_pretrained`` arguments the shipped pipeline needs (SD3 without T5: ``text_encoder_3=None``)."""
        return {}

    @classmethod
    def denoiser_class(cls):
        import diffusers

        return getattr(diffusers, cls.denoiser_class_name)

    @classmethod
    def downsampling(cls, denoiser_config: Dict[str, Any]) -> int:
        """How much the denoiser shrinks its latents (latent sizes must be multiples of it)."""
        return 2 ** (len(denoiser_config["block_out_channels"]) - 1)

    def components(self) -> Dict[str, Any]:
        return {"tokenizer": self.tokenizers[0], "text_encoder": self.text_encoders[0], "safety_checker": None,
                "feature_extractor": None, "requires_safety_checker": False}

    def pipeline(self, denoiser, vae, scheduler):
        pipeline = self.pipeline_class(vae=vae, scheduler=scheduler, **{self.denoiser_name: denoiser}, **self.components())
        pipeline.set_progress_bar_config(disable=True)
        return pipeline


class StableDiffusionXLText(StableDiffusionText):
    """SDXL: two CLIP tokenizers and text encoders (the second with a projection)."""

    family, pipeline_class_name = "sdxl", "StableDiffusionXLPipeline"
    label = "Stable Diffusion XL"

    def __init__(self, path: str, revision: Optional[str] = None, variant: Optional[str] = None, **options):
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

    def conditioning(self, pooled, batch):
        """``added_cond_kwargs``: the pooled text and (original size, crop top-left, target size) per image; the
        target size is the batch's (its aspect-ratio bucket's, or the square resolution's)."""
        target = torch.tensor(batch["pixel_values"].shape[-2:]).expand(len(batch["original_size"]), 2)
        time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], target], dim=1).to(pooled.device, pooled.dtype)
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    def components(self):
        return {"tokenizer": self.tokenizers[0], "tokenizer_2": self.tokenizers[1], "text_encoder": self.text_encoders[0],
                "text_encoder_2": self.text_encoders[1], "add_watermarker": False}


class StableDiffusion3Text(StableDiffusionText):
    """SD3/SD3.5: two CLIP encoders with projections and T5 (optional: ``drop_t5``, or a base saved without it);
    an ``SD3Transformer2DModel`` that takes keyword inputs and the pooled projections."""

    family, pipeline_class_name = "sd3", "StableDiffusion3Pipeline"
    label = "Stable Diffusion 3"
    denoiser_name, denoiser_class_name = "transformer", "SD3Transformer2DModel"
    # diffusers' train_dreambooth_lora_sd3.py's default targets: the joint attention's image and context projections
    lora_target_modules = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                           "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")
    lora_peft_format = True

    def __init__(self, path: str, revision: Optional[str] = None, variant: Optional[str] = None,
                 max_sequence_length: int = 77, drop_t5: bool = False, **options):
        from diffusers import DiffusionPipeline, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        self.max_sequence_length = max_sequence_length
        self.joint_attention_dim = SD3Transformer2DModel.load_config(path, subfolder="transformer", revision=revision)["joint_attention_dim"]
        has_t5 = DiffusionPipeline.load_config(path, revision=revision).get("text_encoder_3", [None])[0] is not None
        self.tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder=f, revision=revision) for f in ("tokenizer", "tokenizer_2")]
        self.text_encoders = [CLIPTextModelWithProjection.from_pretrained(path, subfolder=f, variant=variant, revision=revision)
                              for f in ("text_encoder", "text_encoder_2")]
        self.with_t5 = has_t5 and not drop_t5
        if self.with_t5:
            self.tokenizers.append(T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_3", revision=revision))
            self.text_encoders.append(T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", variant=variant, revision=revision))

    def tokenize(self, captions):
        clip = [t(list(captions), max_length=t.model_max_length, padding="max_length", truncation=True,
                  return_tensors="pt").input_ids for t in self.tokenizers[:2]]
        t5 = [self.tokenizers[2](list(captions), max_length=self.max_sequence_length, padding="max_length", truncation=True,
                                 add_special_tokens=True, return_tensors="pt").input_ids] if self.with_t5 else []
        return clip + t5

    def encode(self, input_ids):
        """diffusers' SD3 ``encode_prompt``: CLIP-L and CLIP-G penultimate hidden states side by side, zero-padded
        to T5's width, then T5's hidden states (zeros of ``max_sequence_length`` tokens without T5) along the
        sequence; the pooled embedding is both CLIP projections side by side."""
        hidden, pooled = [], []
        for encoder, ids in zip(self.text_encoders[:2], input_ids[:2]):
            output = encoder(ids.to(encoder.device), output_hidden_states=True, return_dict=True)
            hidden.append(output.hidden_states[-2])
            pooled.append(output.text_embeds)
        clip = torch.cat(hidden, dim=-1)
        if self.with_t5:
            t5_encoder = self.text_encoders[2]
            t5 = t5_encoder(input_ids[2].to(t5_encoder.device), return_dict=False)[0].to(clip.dtype)
        else:
            t5 = clip.new_zeros(clip.shape[0], self.max_sequence_length, self.joint_attention_dim)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)

    def conditioning(self, pooled, batch):
        return {"pooled_projections": pooled}

    def predict(self, model, noisy, timesteps, context, conditioning):
        return model(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=context, return_dict=False, **conditioning)[0]

    def sampling_kwargs(self):
        return {"max_sequence_length": self.max_sequence_length}

    def loading_kwargs(self):
        """Stock diffusers loads an SD3 folder without T5 only when told (its pipeline lists T5 as required)."""
        return {} if self.with_t5 else {"text_encoder_3": None, "tokenizer_3": None}

    @classmethod
    def downsampling(cls, denoiser_config):
        return denoiser_config["patch_size"]

    def components(self):
        t5 = {"tokenizer_3": self.tokenizers[2], "text_encoder_3": self.text_encoders[2]} if self.with_t5 else {
            "tokenizer_3": None, "text_encoder_3": None}
        return {"tokenizer": self.tokenizers[0], "tokenizer_2": self.tokenizers[1], "text_encoder": self.text_encoders[0],
                "text_encoder_2": self.text_encoders[1], **t5}


FAMILY_CLASSES = {"sd": StableDiffusionText, "sdxl": StableDiffusionXLText, "sd3": StableDiffusion3Text}


def load_text_conditioning(path: str, revision: Optional[str] = None, variant: Optional[str] = None,
                           **options) -> StableDiffusionText:
    """The family's text side for the base at ``path`` (one-line error when it cannot load); ``options`` are the
    family's own (SD3: ``max_sequence_length``, ``drop_t5``)."""
    family = family_of(path, revision)
    try:
        return FAMILY_CLASSES[family](path, revision, variant, **options)
    except Exception as e:
        raise UsageError(f"--pretrained_model_name_or_path {path}: cannot load its text encoders ({describe_exception(e)})") from None
