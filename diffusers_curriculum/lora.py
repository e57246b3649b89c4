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


def lora_state_dict(model, peft_format: bool = False) -> Dict[str, torch.Tensor]:
    """The adapters of ``model`` as diffusers' scripts hand them to ``save_lora_weights``: in diffusers' key format
    for SD 1.x/2.x and SDXL, in peft's (``peft_format``) for SD3."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return state if peft_format else convert_state_dict_to_diffusers(state)


def save_lora_weights(pipeline_cls, output_dir, components: Dict[str, torch.nn.Module], peft_format: bool = False) -> None:
    """The adapters of ``components`` ({pipeline component name: model}: ``unet``, or ``transformer`` for SD3) as
    ``pipeline_cls``'s stock LoRA file in ``output_dir``."""
    layers = {f"{name}_lora_layers": lora_state_dict(model, peft_format) for name, model in components.items()}
    pipeline_cls.save_lora_weights(output_dir, **layers, safe_serialization=True)


def register_lora_hooks(accelerator, components: Dict[str, torch.nn.Module], pipeline_cls, peft_format: bool = False) -> None:
    """``save_state``: the adapters of ``components`` ({pipeline component name: model}, the denoiser's) as
    ``pipeline_cls``'s stock LoRA file instead of the whole models; ``load_state``: the adapters back into them
    (their frozen weights are the base's and are not saved)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    def name_of(model):
        model = accelerator.unwrap_model(model)
        return next((name for name, component in components.items() if component is model), None)

    def save_hook(models, weights, output_dir):
        found = {}
        for i in reversed(range(len(models))):
            name = name_of(models[i])
            if name is not None:
                found[name] = accelerator.unwrap_model(models[i])
                weights.pop(i)  # accelerate saves what is left: the adapters go in the LoRA file instead
        if accelerator.is_main_process and found:
            save_lora_weights(pipeline_cls, output_dir, found, peft_format)

    def load_hook(models, input_dir):
        found = {}
        for i in reversed(range(len(models))):
            name = name_of(models[i])
            if name is not None:
                found[name] = accelerator.unwrap_model(models.pop(i))
        if not found:
            return
        state = pipeline_cls.lora_state_dict(input_dir)
        state = state[0] if isinstance(state, tuple) else state  # SD/SDXL: (state, network alphas); SD3: the state
        for name, target in found.items():
            prefix = f"{name}."
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
