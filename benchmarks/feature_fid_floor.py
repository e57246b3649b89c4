"""Sanity figures of the feature-FID metric on real Fashion-MNIST: extractor accuracy, and FID of the
train split against held-out test images (the floor), blurred test images and uniform noise.

    python benchmarks/feature_fid_floor.py --n 2000 --output benchmarks/results/feature_fid_floor.json
"""

import argparse
import json
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusers_curriculum.metrics import classifier_accuracy, fashion_feature_extractor, fashion_mnist_unit, feature_fid


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="Images per set.")
    parser.add_argument("--cache_dir", type=str, default=None)
    parser.add_argument("--output", type=str, default="benchmarks/results/feature_fid_floor.json")
    args = parser.parse_args()

    extractor = fashion_feature_extractor(args.cache_dir)
    train_x, _ = fashion_mnist_unit("train")
    test_x, test_y = fashion_mnist_unit("test")
    real, held_out = train_x[: args.n], test_x[: args.n]
    result = {
        "date": date.today().isoformat(), "n": args.n,
        "extractor_test_accuracy": classifier_accuracy(extractor, test_x, test_y),
        "fid_train_vs_test": feature_fid(real, held_out, extractor),
        "fid_train_vs_blurred_test": feature_fid(real, F.avg_pool2d(held_out, 3, 1, 1), extractor),
        "fid_train_vs_noise": feature_fid(real, torch.rand(held_out.shape, generator=torch.Generator().manual_seed(0)), extractor),
    }
    for key, value in result.items():
        print(f"{key:28s} {value}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
