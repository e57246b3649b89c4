"""LoRA fine-tuning the diffusers way: adapter-only checkpoints, the frozen base in the weight dtype.

``add_lora`` adds peft adapters to a denoiser, puts its frozen weights in the run's weight dtype (half the memory
under fp16/bf16) and keeps the trainable adapter weights in fp32 (diffusers' ``cast_training_params``).
``register_lora_hooks`` makes ``accelerator.save_state`` write the adapters only, as the stock LoRA file
(``pytorch_lora_weights.safetensors``, read by ``pipeline.load_lora_weights(checkpoint_dir)``), and
``load_state`` read them back, as diffusers' ``train_text_to_image_lora.py`` does with its save/load hooks.
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
UNET_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")


def add_lora(model, rank: int, alpha: float, dropout: float, weight_dtype: torch.dtype, device,
             target_modules: Sequence[str] = UNET_TARGET_MODULES) -> None:
    """Freezes ``model``, adds a rank-``rank`` adapter (scale ``alpha / rank``, ``dropout`` on its input) to each
    target module, casts the frozen weights to ``weight_dtype`` on ``device`` and the adapters to fp32."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                                 target_modules=list(target_modules)))
    model.to(device, dtype=weight_dtype)
    cast_training_params(model, dtype=torch.float32)


def lora_state_dict(model, component: str = "unet") -> Dict[str, torch.Tensor]:
    """The adapters of ``model`` as diffusers' scripts hand them to ``save_lora_weights``: a UNet's in diffusers'
    key format (``unet_lora_layers``), a transformer's in peft's (``transformer_lora_layers``)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return convert_state_dict_to_diffusers(state) if component == "unet" else state


def save_lora_weights(pipeline_cls, output_dir, model, component: str = "unet") -> None:
    """``model``'s adapters as ``pipeline_cls``'s stock LoRA file in ``output_dir``, under the pipeline's
    ``component`` (``unet``, or ``transformer`` for SD3)."""
    pipeline_cls.save_lora_weights(output_dir, **{f"{component}_lora_layers": lora_state_dict(model, component)},
                                   safe_serialization=True)


def register_lora_hooks(accelerator, model, pipeline_cls, component: str = "unet") -> None:
    """``save_state``: the adapters of ``model`` as ``pipeline_cls``'s stock LoRA file instead of the whole model;
    ``load_state``: the adapters back into ``model`` (its frozen weights are the base's and are not saved).
    ``component``: the pipeline's name for the denoiser (``unet``, or ``transformer`` for SD3)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    kind = type(accelerator.unwrap_model(model))

    def save_hook(models, weights, output_dir):
        denoiser = None
        for i in reversed(range(len(models))):
            if isinstance(accelerator.unwrap_model(models[i]), kind):
                denoiser = accelerator.unwrap_model(models[i])
                weights.pop(i)  # accelerate saves what is left: the adapters go in the LoRA file instead
        if accelerator.is_main_process and denoiser is not None:
            save_lora_weights(pipeline_cls, output_dir, denoiser, component)

    def load_hook(models, input_dir):
        target = None
        for i in reversed(range(len(models))):
            if isinstance(accelerator.unwrap_model(models[i]), kind):
                target = accelerator.unwrap_model(models.pop(i))
        if target is None:
            return
        state = pipeline_cls.lora_state_dict(input_dir)
        state = state[0] if isinstance(state, tuple) else state  # SD/SDXL: (state, network alphas); SD3: the state
        prefix = f"{component}."
        adapters = convert_unet_state_dict_to_peft({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        incompatible = set_peft_model_state_dict(target, adapters, adapter_name="default")
        unexpected = getattr(incompatible, "unexpected_keys", None)
        if unexpected:
            raise RuntimeError(f"the checkpoint's LoRA weights do not fit the model: unexpected keys {unexpected[:3]}")
        for param in target.parameters():  # loaded adapters keep training in fp32
            if param.requires_grad:
                param.data = param.data.float()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
