#!/usr/bin/env python
"""Class-conditional image generation with a timestep-aware training regime.

The unconditional script's flags (``train_unconditional.py``) plus ``--num_classes``, ``--label_column``,
``--class_dropout_prob`` (classifier-free guidance training) and ``--guidance_scale`` (validation samples).
The UNet is a ``UNet2DModel`` with ``num_class_embeds = num_classes + 1`` (the last is the null class);
the saved pipeline is a ``diffusers_curriculum.ClassConditionalPipeline``. Default data: Fashion-MNIST's
10 classes; an image folder with one sub-folder per class, or a ``datasets`` set with ``--label_column``.

    accelerate launch train_scripts/train_class_conditional.py --output_dir fmnist-classcond --max_train_steps 1000
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_unconditional  # noqa: E402  (the shared loop; this script only swaps the task)

from diffusers_curriculum.errors import exits_on_usage_error  # noqa: E402
from diffusers_curriculum.tasks import ClassConditional  # noqa: E402


def build_parser():
    return train_unconditional.build_parser(task_cls=ClassConditional)


def parse_args(argv=None):
    return train_unconditional.parse_args(argv, task_cls=ClassConditional)


def main(args, evaluate=None):
    return train_unconditional.main(args, evaluate=evaluate)


@exits_on_usage_error
def cli(argv=None):
    main(parse_args(argv))


if __name__ == "__main__":
    cli()
