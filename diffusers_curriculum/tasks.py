"""What a pixel-space training script conditions on: nothing, or a class label.

``train_scripts/train_unconditional.py`` runs the loop; a task adds its flags, checks the data, extends the
UNet config, gives the extra model inputs of a batch and builds the pipeline that is saved. A task is made from
plain values (its flags' values, checked when it is made: ``config.from_flags(TASKS[name], vars(args))``).
``train_scripts/train_class_conditional.py`` is the unconditional script with :class:`ClassConditional`.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional

import torch
from diffusers import DDPMPipeline

from .data import class_names
from .errors import UsageError
from .pipelines import ClassConditionalPipeline


class Unconditional:
    """Images only (``DDPMPipeline``)."""

    name = "unconditional"
    card_template = "unconditional"
    pipeline_tag = "unconditional-image-generation"

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        pass

    def __init__(self, process_index: int = 0, num_processes: int = 1):
        self.process_index, self.num_processes = process_index, num_processes

    def check_dataset(self, dataset) -> None:
        pass

    def unet_config(self, config: Dict[str, Any]) -> Dict[str, Any]:
        return config

    def model_kwargs(self, batch: Dict[str, torch.Tensor], device) -> Dict[str, Any]:
        return {}

    def build_pipeline(self, unet, scheduler):
        return DDPMPipeline(unet=unet, scheduler=scheduler)

    def generate(self, pipeline, num_images: int, num_inference_steps: int, generator: torch.Generator) -> List:
        return pipeline(generator=generator, batch_size=num_images, num_inference_steps=num_inference_steps,
                        output_type="pil").images

    def card_settings(self) -> Dict[str, Any]:
        return {}

    def card_kwargs(self, dataset) -> Dict[str, Any]:
        """What the task's card template needs beyond the common fields."""
        return {}


class ClassConditional(Unconditional):
    """Class labels from the data set; ``--class_dropout_prob`` trains the null class for guidance."""

    name = "class_conditional"
    card_template = "class_conditional"
    pipeline_tag = None  # the Hub has no class-conditional task tag
    # Class dropout draws from its own generator (global-batch draw, rank slice, like the regime's noise),
    # checkpointed with the run: the global RNG is also used by data loaders and would not resume exactly.
    DROPOUT_SEED_SALT = 0x5EED

    def __init__(self, num_classes: Optional[int] = None, class_dropout_prob: float = 0.1, guidance_scale: float = 1.0,
                 dataset_name: Optional[str] = None, train_data_dir: Optional[str] = None, seed: Optional[int] = None,
                 process_index: int = 0, num_processes: int = 1):
        super().__init__(process_index, num_processes)
        if not 0 <= class_dropout_prob < 1:
            raise UsageError(f"--class_dropout_prob must be in [0, 1), got {class_dropout_prob}")
        if num_classes is not None and num_classes < 1:
            raise UsageError(f"--num_classes must be >= 1, got {num_classes}")
        if guidance_scale != 1.0 and class_dropout_prob == 0:
            raise UsageError("--guidance_scale needs --class_dropout_prob > 0 (the null class must be trained)")
        self.num_classes, self.class_dropout_prob, self.guidance_scale = num_classes, class_dropout_prob, guidance_scale
        self.names_from = dataset_name if train_data_dir is None else None  # where class names come from (an embedded set)
        self.generator = torch.Generator().manual_seed((seed or 0) + self.DROPOUT_SEED_SALT)

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("class conditioning")
        group.add_argument("--num_classes", type=int, default=None,
                           help="Number of classes (default: 10 for the embedded sets, else largest label + 1).")
        group.add_argument("--label_column", type=str, default="label",
                           help="Label column of a datasets set (image folders: the class sub-folders).")
        group.add_argument("--class_dropout_prob", type=float, default=0.1,
                           help="Probability of replacing a label by the null class (classifier-free guidance training).")
        group.add_argument("--guidance_scale", type=float, default=1.0, help="Guidance scale of the validation samples.")

    def check_dataset(self, dataset) -> None:
        """Every label must be a class index in [0, num_classes); sets ``num_classes`` when not given."""
        labels = dataset_labels(dataset)
        if labels.numel() == 0 or int(labels.min()) < 0:
            raise UsageError("class-conditional training needs labels: the data set has none "
                             "(pass --label_column, or use an image folder with one sub-folder per class)")
        largest = int(labels.max())
        if self.num_classes is None:
            self.num_classes = largest + 1
        elif largest >= self.num_classes:
            raise UsageError(f"class label {largest} in the data set is >= --num_classes {self.num_classes}")

    @property
    def null_class(self) -> int:
        return self.num_classes

    def unet_config(self, config: Dict[str, Any]) -> Dict[str, Any]:
        return {**config, "num_class_embeds": self.num_classes + 1}

    def model_kwargs(self, batch, device):
        labels = batch["labels"].to(device)
        if self.class_dropout_prob > 0:
            draw = torch.rand(labels.shape[0] * self.num_processes, generator=self.generator)
            drop = draw[self.process_index :: self.num_processes] < self.class_dropout_prob
            labels = torch.where(drop.to(device), torch.full_like(labels, self.null_class), labels)
        return {"class_labels": labels}

    def state_dict(self) -> Dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def build_pipeline(self, unet, scheduler):
        return ClassConditionalPipeline(unet=unet, scheduler=scheduler, num_classes=self.num_classes,
                                        guidance_trained=self.class_dropout_prob > 0)

    def generate(self, pipeline, num_images, num_inference_steps, generator):
        labels = [i % self.num_classes for i in range(num_images)]
        return pipeline(class_labels=labels, guidance_scale=self.guidance_scale, generator=generator,
                        num_inference_steps=num_inference_steps, output_type="pil").images

    def card_settings(self) -> Dict[str, Any]:
        return {"num_classes": self.num_classes, "class_dropout_prob": self.class_dropout_prob}

    def card_kwargs(self, dataset) -> Dict[str, Any]:
        """The label of each class index (where the data names them) and the labels the card's snippet samples."""
        names = class_names(self.names_from, dataset, self.num_classes)
        labels = list(range(min(4, self.num_classes)))
        return {"class_names": names, "example_labels": labels,
                "example_names": ", ".join(names[label] for label in labels) if names else None}


def dataset_labels(dataset) -> torch.Tensor:
    """All labels of a data set built by :func:`diffusers_curriculum.data.build_dataset` (−1 = none)."""
    if hasattr(dataset, "labels"):
        return torch.as_tensor(dataset.labels)
    if getattr(dataset, "label_column", None) is None:
        return torch.full((len(dataset),), -1)
    column = dataset.dataset[dataset.label_column]
    if column and not isinstance(column[0], (int, bool)):
        raise UsageError(f"--label_column {dataset.label_column!r} holds {type(column[0]).__name__} values, not class indices")
    return torch.as_tensor(column, dtype=torch.long)


TASKS = {"unconditional": Unconditional, "class_conditional": ClassConditional}
