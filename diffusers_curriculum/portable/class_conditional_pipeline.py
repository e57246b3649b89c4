"""A class-conditional pixel-space pipeline with classifier-free guidance.

This file is self-contained (torch and diffusers only): a saved class-conditional pipeline carries a copy of it
at its root and names it in ``model_index.json`` (``"_class_name": ["class_conditional_pipeline",
"ClassConditionalPipeline"]``), so stock diffusers loads it without ``diffusers_curriculum``:

    pipeline = DiffusionPipeline.from_pretrained("fmnist-classcond", trust_remote_code=True)
    images = pipeline(class_labels=[7, 7, 9], guidance_scale=3.0).images   # two sneakers, one ankle boot

The UNet (``UNet2DModel`` with ``num_class_embeds = num_classes + 1``, or timestep-routed experts of them)
embeds label ``num_classes`` as "no class": a model trained with ``--class_dropout_prob`` > 0 supports
classifier-free guidance, eps = eps(null) + s * (eps(y) - eps(null)).
"""

from typing import List, Optional, Sequence, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class ClassConditionalPipeline(DiffusionPipeline):
    """Generates images of requested classes.

    Args:
        unet: a class-conditional denoiser (``class_labels`` keyword, ``num_classes + 1`` embeddings).
        scheduler: any diffusers scheduler.
        num_classes: the number of real classes; label ``num_classes`` is the null (unconditional) class.
        guidance_trained: whether the null class was trained (``--class_dropout_prob`` > 0).
    """

    model_cpu_offload_seq = "unet"

    # num_classes has a default only so that diffusers treats it as a config value, not a component.
    def __init__(self, unet, scheduler, num_classes: Optional[int] = None, guidance_trained: bool = False):
        super().__init__()
        if num_classes is None or num_classes < 1:
            raise ValueError(f"num_classes must be a positive number of classes, got {num_classes}")
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(num_classes=int(num_classes), guidance_trained=bool(guidance_trained))

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Union[int, Sequence[int]],
        guidance_scale: float = 1.0,
        num_inference_steps: int = 1000,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        labels = [class_labels] if isinstance(class_labels, int) else list(class_labels)
        num_classes = self.config.num_classes
        if not labels or any(not 0 <= int(y) < num_classes for y in labels):
            raise ValueError(f"class_labels {labels} must be in [0, {num_classes})")
        if guidance_scale != 1.0 and not self.config.guidance_trained:
            raise ValueError("guidance_scale != 1 needs a model trained with --class_dropout_prob > 0")
        guided = guidance_scale != 1.0
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (len(labels), self.unet.config.in_channels, *size)
        image = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        labels_t = torch.tensor(labels, device=self.device, dtype=torch.long)
        if guided:
            labels_t = torch.cat([labels_t, torch.full_like(labels_t, num_classes)])

        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([image, image]) if guided else image
            output = self.unet(model_input, t, class_labels=labels_t).sample
            if guided:
                conditional, unconditional = output.chunk(2)
                output = unconditional + guidance_scale * (conditional - unconditional)
            image = self.scheduler.step(output, t, image, generator=generator).prev_sample

        image = (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        return ImagePipelineOutput(images=image) if return_dict else (image,)

