"""Training images: the embedded offline data sets, image folders and Hub data sets.

Every source becomes a ``torch.utils.data.Dataset`` of ``{"pixel_values": (C, H, W) float in [-1, 1],
"labels": int}`` items (``labels`` is -1 where the source has none).

* ``fashion_mnist`` (default): Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, read from
  its IDX files; falls back to the Hub copy through ``datasets`` when the package is missing.
* ``digits``: scikit-learn's 8×8 digits, the tiny fallback for smoke tests.
* ``--train_data_dir``: any image folder (``datasets``' ``imagefolder``).
* any other ``--dataset_name``: a ``datasets`` data set with an image column.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import UsageError, describe_exception

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
BUILTIN_DATASETS = ("fashion_mnist", "digits")
HUB_DATASET_IDS = {"fashion_mnist": FASHION_MNIST_HUB_ID}  # what a model card names as the data
# --image_interpolation_mode: the resize filter (diffusers' text-to-image flag; PIL's filters).
INTERPOLATION_MODES = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
PIL_FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS,
               "box": Image.BOX, "hamming": Image.HAMMING}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def read_idx(path: Path) -> np.ndarray:
    """Reads a (gzipped) IDX file (the MNIST format) into a uint8 array."""
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UsageError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise UsageError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {array.size}")
    return array.reshape(shape)


def load_fashion_mnist(split: str = "train", root: Optional[Path] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as ``(images uint8 (N, 28, 28), labels int64 (N,))``.

    Reads the Debian package's files; where they are missing, tries the Hub copy (needs network).
    """
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    if images_path.exists() and labels_path.exists():
        return read_idx(images_path), read_idx(labels_path).astype(np.int64)
    try:
        import datasets

        hub = datasets.load_dataset(FASHION_MNIST_HUB_ID, split=split)
        images = np.stack([np.asarray(image, dtype=np.uint8) for image in hub["image"]])
        return images, np.asarray(hub["label"], dtype=np.int64)
    except Exception as e:  # offline, missing package, Hub error: one line naming both ways
        raise UsageError(
            f"--dataset_name fashion_mnist: no files in {root} and the Hub copy failed ({type(e).__name__}); "
            "install it with `apt-get install dataset-fashion-mnist` or run with network access"
        ) from None


def load_digits() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``(images uint8 (1797, 8, 8), labels)``."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise UsageError("--dataset_name digits needs scikit-learn: pip install scikit-learn") from None
    digits = sklearn_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


class ItemRandomness:
    """Per-item randomness (flips, crops, caption choice) drawn from ``(seed, epoch, index)``, not from the
    global RNG: an item looks the same however the data loader prefetches, however many workers read it, and
    after a resume (accelerate checkpoints the global RNG one prefetched batch late). The training loop calls
    :meth:`set_epoch` before each epoch."""

    seed: int = 0
    epoch: int = 0
    stream: int = 0  # a wrapper that draws too uses another stream

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def item_rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng((int(self.seed), self.epoch, int(index), self.stream))


class TensorImageDataset(ItemRandomness, torch.utils.data.Dataset):
    """In-memory images, resized once to ``resolution`` (a side, or (height, width)) and scaled to [-1, 1]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, resolution, random_flip: bool = False, seed: int = 0,
                 interpolation: str = "bilinear"):
        images = np.asarray(images)
        self.original_size = torch.tensor(images.shape[1:3])  # (height, width); resized whole: no crop
        height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
        if tuple(images.shape[1:3]) != (height, width) and interpolation not in ("nearest", "bilinear", "bicubic"):  # PIL-only filters
            images = np.stack([np.asarray(Image.fromarray(image).resize((width, height), PIL_FILTERS[interpolation]))
                               for image in images])
        pixels = torch.from_numpy(np.array(images, copy=True)).float().div_(127.5).sub_(1.0)
        if pixels.ndim == 3:
            pixels = pixels[:, None]
        if tuple(pixels.shape[-2:]) != (height, width):
            pixels = F.interpolate(pixels, size=(height, width), mode=interpolation,
                                   align_corners=None if interpolation == "nearest" else False)
        self.pixels = pixels.clamp_(-1.0, 1.0)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.random_flip, self.seed = random_flip, seed

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __getitem__(self, index: int):
        pixels = self.pixels[index]
        if self.random_flip and self.item_rng(index).random() < 0.5:
            pixels = pixels.flip(-1)
        return {"pixel_values": pixels, "labels": self.labels[index], "original_size": self.original_size,
                "crop_top_left": torch.zeros(2, dtype=torch.long)}


def pil_to_tensor(
    image: Image.Image, resolution, mode: str, center_crop: bool = True, random_flip: bool = False,
    rng: Optional[np.random.Generator] = None, interpolation: str = "bilinear", geometry: Optional[dict] = None,
) -> torch.Tensor:
    """Resize (to cover the target) → crop → optional flip → (C, H, W) float in [-1, 1]; PIL + numpy only. The
    target is ``resolution``: a side (a square) or (height, width) (an aspect-ratio bucket). The random crop and flip
    draw from ``rng`` (default: a fresh unseeded one). ``geometry``, when given, receives the image's
    ``original_size`` (height, width) and the ``crop_top_left`` (top, left) of the crop in the resized image, of
    the flipped image when flipped (SDXL's size and crop conditioning)."""
    rng = rng if rng is not None else np.random.default_rng()
    target_h, target_w = (resolution, resolution) if isinstance(resolution, int) else resolution
    image = image.convert(mode)
    original = (image.height, image.width)
    scale = max(target_h / image.height, target_w / image.width)
    width, height = max(target_w, round(image.width * scale)), max(target_h, round(image.height * scale))
    image = image.resize((width, height), PIL_FILTERS[interpolation])
    if center_crop:
        left, top = (width - target_w) // 2, (height - target_h) // 2
    else:
        left = int(rng.integers(0, width - target_w + 1))
        top = int(rng.integers(0, height - target_h + 1))
    image = image.crop((left, top, left + target_w, top + target_h))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    tensor = torch.from_numpy(array[..., None] if array.ndim == 2 else array).permute(2, 0, 1)
    if random_flip and rng.random() < 0.5:
        tensor = tensor.flip(-1)
        left = width - left - target_w
    if geometry is not None:
        geometry.update(original_size=torch.tensor(original), crop_top_left=torch.tensor((top, left)))
    return tensor.contiguous()


class HFImageDataset(ItemRandomness, torch.utils.data.Dataset):
    """A ``datasets.Dataset`` with an image column, transformed on access."""

    def __init__(self, dataset, image_column: str, label_column: Optional[str], resolution: int, mode: str,
                 center_crop: bool, random_flip: bool, seed: int = 0, interpolation: str = "bilinear", buckets=None):
        self.dataset, self.image_column, self.label_column = dataset, image_column, label_column
        self.resolution, self.mode, self.center_crop, self.random_flip = resolution, mode, center_crop, random_flip
        self.seed, self.interpolation, self.buckets = seed, interpolation, buckets
        self.bucket_of = None if buckets is None else self._sort_into(buckets)

    def _sort_into(self, buckets) -> np.ndarray:
        """Each image's bucket (nearest aspect ratio); reads every image's size once (its header, not its pixels)."""
        from tqdm.auto import tqdm

        from .buckets import nearest_bucket

        bucket_of = np.empty(len(self.dataset), dtype=np.int64)
        for index in tqdm(range(len(self.dataset)), desc="Sorting images into buckets", disable=len(self.dataset) < 1000):
            try:
                image = self.dataset[index][self.image_column]
                bucket_of[index] = nearest_bucket(image.height, image.width, buckets)
            except (OSError, ValueError, AttributeError) as e:
                raise UsageError(f"image {index} of the training data cannot be read ({describe_exception(e)})") from None
        return bucket_of

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            row = self.dataset[index]  # datasets decodes the image here
            geometry = {}
            size = self.resolution if self.bucket_of is None else self.buckets[self.bucket_of[index]]
            pixels = pil_to_tensor(row[self.image_column], size, self.mode, self.center_crop, self.random_flip,
                                   self.item_rng(index), self.interpolation, geometry)
        except (OSError, ValueError, AttributeError) as e:
            raise UsageError(f"image {index} of the training data cannot be read ({describe_exception(e)})") from None
        label = int(row[self.label_column]) if self.label_column else -1
        return {"pixel_values": pixels, "labels": torch.tensor(label), **geometry}


def image_check_cache() -> Path:
    """Where the verdicts of :func:`check_images` are kept (``$DIFFUSERS_CURRICULUM_CACHE`` or
    ``~/.cache/diffusers-curriculum``)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffusers-curriculum"
    return Path(os.environ.get("DIFFUSERS_CURRICULUM_CACHE", default)) / "checked-images.json"


def check_images(paths, flag: str = "--train_data_dir") -> None:
    """Decodes every image in ``paths`` (a header check misses a PNG whose data is corrupt) before training
    starts, with a progress bar, and names every unreadable file in one error line. Files that decoded are
    remembered by path, size and modification time, so a re-run does not pay twice."""
    from tqdm.auto import tqdm

    cache_file = image_check_cache()
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        known = {}
    stamps = {}  # path -> (its cache key, [size, mtime])
    for path in paths:
        stat = path.stat()
        stamps[path] = (str(path.resolve()), [stat.st_size, stat.st_mtime_ns])
    todo = [path for path, (key, stamp) in stamps.items() if known.get(key) != stamp]
    bad = []
    for path in tqdm(todo, desc="Checking images", unit="img", disable=len(todo) < 2, leave=False):
        try:
            with Image.open(path) as image:
                image.load()
            key, stamp = stamps[path]
            known[key] = stamp
        except Exception as e:
            bad.append((path, e))
    if todo and len(todo) > len(bad):
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only cache only costs the next run the check again
    if bad:
        names = ", ".join(str(p) for p, _ in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise UsageError(f"{flag}: {len(bad)} unreadable image{'s' if len(bad) > 1 else ''}: {names} "
                         f"(first: {type(bad[0][1]).__name__}); remove or replace them")


def check_metadata(root: Path) -> None:
    """Every line of every ``metadata.jsonl`` in the folder is a JSON object (one-line error naming file and line)."""
    for path in sorted(root.rglob("metadata.jsonl")):
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except ValueError as e:
                    raise UsageError(f"--train_data_dir: {path} line {number} is not valid JSON ({e.args[0].split(':')[0]})") from None
                if not isinstance(value, dict):
                    raise UsageError(f"--train_data_dir: {path} line {number} is not a JSON object")


def _check_image_folder(train_data_dir: str) -> None:
    root = Path(train_data_dir)
    if not root.is_dir():
        raise UsageError(f"--train_data_dir {train_data_dir} is not a folder")
    images = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise UsageError(f"--train_data_dir {train_data_dir} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    check_metadata(root)
    check_images(images)


def build_dataset(
    dataset_name: Optional[str] = "fashion_mnist",
    train_data_dir: Optional[str] = None,
    resolution: int = 32,
    image_column: str = "image",
    label_column: Optional[str] = None,
    image_mode: Optional[str] = None,
    center_crop: bool = True,
    random_flip: bool = False,
    dataset_config_name: Optional[str] = None,
    cache_dir: Optional[str] = None,
    max_train_samples: Optional[int] = None,
    seed: int = 0,
    interpolation: str = "bilinear",
) -> torch.utils.data.Dataset:
    """The training set the flags describe (see the module docstring); ``image_mode`` ``"L"`` or ``"RGB"``
    applies to image folders and Hub data sets (default RGB); the embedded sets are grey (one channel).
    ``seed`` seeds the per-item flips and crops (:class:`ItemRandomness`); ``interpolation`` is the resize filter
    (one of :data:`INTERPOLATION_MODES`)."""
    if train_data_dir is None and dataset_name in BUILTIN_DATASETS:
        return TensorImageDataset(*builtin_arrays(dataset_name, max_train_samples), resolution, random_flip, seed, interpolation)

    hf = _load_hf(dataset_name, train_data_dir, dataset_config_name, cache_dir, max_train_samples,
                  {"--image_column": image_column, "--label_column": label_column})
    return HFImageDataset(hf, image_column, label_column, resolution, image_mode or "RGB", center_crop, random_flip, seed,
                          interpolation)


def builtin_arrays(dataset_name: str, max_train_samples: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(images, labels) of an embedded set, the first ``max_train_samples`` only when given."""
    images, labels = load_fashion_mnist() if dataset_name == "fashion_mnist" else load_digits()
    return (images, labels) if max_train_samples is None else (images[:max_train_samples], labels[:max_train_samples])


def _load_hf(dataset_name, train_data_dir, dataset_config_name, cache_dir, max_train_samples, columns):
    """A ``datasets`` split from an image folder or the Hub, checked to hold ``columns`` ({flag: name};
    ``None`` names are skipped) and not to be empty, cut to ``max_train_samples``."""
    import datasets

    if train_data_dir is not None:
        _check_image_folder(train_data_dir)
        hf = datasets.load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir, split="train")
    else:
        try:
            hf = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split="train")
        except Exception as e:
            raise UsageError(f"--dataset_name {dataset_name}: cannot load it ({describe_exception(e)})") from None
    for flag, column in columns.items():
        if column is not None and column not in hf.column_names:
            raise UsageError(f"{flag} {column!r} is not a column of the data set ({', '.join(hf.column_names)})")
    if len(hf) == 0:
        raise UsageError("the training data set is empty")
    if max_train_samples is not None:
        hf = hf.select(range(min(max_train_samples, len(hf))))
    return hf


def describe_data(dataset_name: Optional[str], train_data_dir: Optional[str], num_examples: int,
                  max_train_samples: Optional[int] = None) -> str:
    """The training data in words, for a model card: where it came from and which part of it was used (no local
    paths: a card is published)."""
    if train_data_dir is not None:
        source, detail = "a local image folder", None
    elif dataset_name == "fashion_mnist":
        source, detail = "Fashion-MNIST's training split", f"{FASHION_MNIST_HUB_ID}, read offline from Debian's `dataset-fashion-mnist`"
    elif dataset_name == "digits":
        source, detail = "scikit-learn's digits", "8×8 grey images"
    else:
        source, detail = f"the training split of `{dataset_name}`", None
    if max_train_samples is not None and num_examples <= max_train_samples:
        part, detail = f"the first {num_examples:,} images of {source}", "; ".join(filter(None, [detail, f"`--max_train_samples {max_train_samples}`"]))
    else:
        part = f"all {num_examples:,} images of {source}"
    return f"{part} ({detail})" if detail else part


def class_names(dataset_name: Optional[str], dataset, num_classes: int) -> Optional[List[str]]:
    """The names of labels 0 .. num_classes - 1 where the data has them: the embedded sets' classes, a ``datasets``
    ``ClassLabel`` column (image folders: the class sub-folders); ``None`` otherwise."""
    names = None
    if getattr(dataset, "label_column", None) is not None:
        feature = dataset.dataset.features.get(dataset.label_column)
        names = getattr(feature, "names", None)
    elif dataset_name == "fashion_mnist":
        names = list(FASHION_MNIST_CLASSES)
    elif dataset_name == "digits":
        names = [str(i) for i in range(10)]
    return list(names[:num_classes]) if names and len(names) >= num_classes else None


def num_channels(dataset: torch.utils.data.Dataset) -> int:
    """Channels of the images a dataset yields (reads the first item)."""
    return int(dataset[0]["pixel_values"].shape[0])


# ---- captioned images (text-to-image) ---------------------------------------------------------------------
def fashion_mnist_caption(label: int) -> str:
    name = FASHION_MNIST_CLASSES[int(label)].lower()
    return f"a photo of {'an' if name[0] in 'aeiou' else 'a'} {name}"


class CaptionedDataset(ItemRandomness, torch.utils.data.Dataset):
    """``{"pixel_values": (3, H, W) in [-1, 1], "caption": str}`` items. ``captions[i]`` is a string or a list
    of strings (one is picked at random per epoch, like diffusers' script). With ``empty_prompt_prob`` p, a caption
    is replaced by "" with probability p, drawn anew per item and epoch (caption dropout, for classifier-free
    guidance: diffusers' ``--proportion_empty_prompts``); every draw comes from (seed, epoch, index), so a resumed
    run drops the same captions."""

    stream = 1

    def __init__(self, images: torch.utils.data.Dataset, captions, empty_prompt_prob: float = 0.0):
        self.images, self.captions, self.empty_prompt_prob = images, captions, empty_prompt_prob
        self.seed = getattr(images, "seed", 0)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.images.set_epoch(epoch)

    def all_captions(self) -> List[str]:
        """Every caption an item can take: each caption (of each list), and "" under caption dropout."""
        captions = [c for caption in self.captions for c in (caption if isinstance(caption, (list, tuple)) else [caption])]
        return captions + ([""] if self.empty_prompt_prob else [])

    @property
    def bucket_of(self) -> Optional[np.ndarray]:
        """Each item's aspect-ratio bucket (``None`` without buckets)."""
        return getattr(self.images, "bucket_of", None)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        item = self.images[index]
        pixels = item["pixel_values"]
        if pixels.shape[0] == 1:
            pixels = pixels.expand(3, -1, -1)
        caption, rng = self.captions[index], self.item_rng(index)
        if isinstance(caption, (list, tuple)):
            caption = caption[int(rng.integers(len(caption)))]
        if self.empty_prompt_prob and rng.random() < self.empty_prompt_prob:
            caption = ""
        return {"pixel_values": pixels, "caption": caption, "index": index, "original_size": item["original_size"],
                "crop_top_left": item["crop_top_left"]}


def build_caption_dataset(
    dataset_name: Optional[str] = "fashion_mnist",
    train_data_dir: Optional[str] = None,
    resolution: int = 16,
    image_column: str = "image",
    caption_column: str = "text",
    center_crop: bool = True,
    random_flip: bool = False,
    dataset_config_name: Optional[str] = None,
    cache_dir: Optional[str] = None,
    max_train_samples: Optional[int] = None,
    seed: int = 0,
    interpolation: str = "bilinear",
    empty_prompt_prob: float = 0.0,
    buckets=None,
) -> CaptionedDataset:
    """Captioned training images. ``fashion_mnist`` is captioned from its labels ("a photo of a sneaker");
    image folders need a ``metadata.jsonl`` with the caption column; Hub sets need both columns. ``empty_prompt_prob``:
    caption dropout (:class:`CaptionedDataset`). ``buckets``: aspect-ratio buckets ((height, width) each,
    :mod:`~diffusers_curriculum.buckets`); each image is cropped to its nearest instead of a ``resolution`` square."""
    if train_data_dir is None and dataset_name == "fashion_mnist":
        from .buckets import nearest_bucket

        images, labels = builtin_arrays("fashion_mnist", max_train_samples)
        size = resolution if buckets is None else buckets[nearest_bucket(*images.shape[1:3], buckets)]  # one shape, one bucket
        images = TensorImageDataset(images, labels, size, random_flip, seed, interpolation)
        if buckets is not None:
            images.bucket_of = np.full(len(images), buckets.index(size))
        return CaptionedDataset(images, [fashion_mnist_caption(y) for y in images.labels.tolist()], empty_prompt_prob)
    if train_data_dir is None and dataset_name in BUILTIN_DATASETS:
        raise UsageError(f"--dataset_name {dataset_name} has no captions; use fashion_mnist or a captioned set")

    hf = _load_hf(dataset_name, train_data_dir, dataset_config_name, cache_dir, max_train_samples,
                  {"--image_column": image_column, "--caption_column": caption_column})
    feature = hf.features[caption_column]
    inner = getattr(feature, "feature", None) if not hasattr(feature, "dtype") else feature
    if getattr(inner, "dtype", None) not in ("string", "large_string"):
        raise UsageError(f"--caption_column {caption_column!r} must hold strings or lists of strings, not {feature}")
    images = HFImageDataset(hf, image_column, None, resolution, "RGB", center_crop, random_flip, seed, interpolation, buckets)
    return CaptionedDataset(images, hf[caption_column], empty_prompt_prob)
