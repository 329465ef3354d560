"""cifar10 and imagefolder loaders on tiny files written in the real on-disk formats."""

import pickle

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from compresslab.errors import ConfigError
from conftest import compose_cfg

CLASSES = ["cat", "dog", "ship"]


def write_cifar10(root, per_batch: int = 6):
    """The python-format CIFAR-10 folder: pickled dicts of uint8 rows (R, G, B planes)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        batches[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data,
                         "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)],
                     "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return batches


def write_imagefolder(root, per_class: int = 3, size: int = 12):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in CLASSES:
            (root / split / label).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")


def datamodule(tmp_path, overrides):
    cfg = compose_cfg(["model=vit_tiny", *overrides], tmp_path / "out")
    return instantiate(cfg.dataset.datamodule)


def test_cifar10_reads_the_python_batches(tmp_path):
    batches = write_cifar10(tmp_path / "cifar")
    data = datamodule(tmp_path, ["dataset=cifar10", f"dataset.datamodule.root={tmp_path}/cifar",
                                 "dataset.datamodule.verify=false",
                                 "dataset.datamodule.val_fraction=0.2"])
    data.check()
    data.load()
    assert len(data.split("train")) + len(data.split("val")) == 30
    assert len(data.split("val")) == 6 and len(data.split("test")) == 6
    image, label = data.split("test")[2]
    raw, labels = batches["test_batch"]
    expected = torch.from_numpy(raw[2].reshape(3, 32, 32).astype(np.float32) / 255)
    mean = torch.tensor(data.mean)[:, None, None]
    std = torch.tensor(data.std)[:, None, None]
    torch.testing.assert_close(image, (expected - mean) / std)
    assert label == labels[2]
    images, targets = next(iter(data.train_dataloader()))
    assert images.shape[1:] == (3, 32, 32) and targets.dtype == torch.int64
    assert data.spec().num_classes == 10


def test_cifar10_verification_rejects_files_that_are_not_the_official_ones(tmp_path):
    write_cifar10(tmp_path / "cifar")
    data = datamodule(tmp_path, ["dataset=cifar10", f"dataset.datamodule.root={tmp_path}/cifar"])
    data.check()
    with pytest.raises(ConfigError, match="corrupted"):
        data.load()


def test_imagefolder_reads_class_folders(tmp_path):
    write_imagefolder(tmp_path / "imgs")
    data = datamodule(tmp_path, ["dataset=imagefolder",
                                 f"dataset.datamodule.root={tmp_path}/imgs",
                                 "dataset.datamodule.image_size=8",
                                 "dataset.datamodule.channels=1",
                                 "dataset.datamodule.val_fraction=0.25"])
    data.check()
    spec = data.spec()
    assert (spec.num_classes, spec.image_size, spec.channels) == (3, 8, 1)
    data.load()
    assert len(data.split("train")) == 7 and len(data.split("val")) == 2
    assert len(data.split("test")) == 9
    image, label = data.split("test")[4]
    assert image.shape == (1, 8, 8) and label == 1  # sorted classes: cat, dog, ship
    assert -1.0 <= float(image.min()) and float(image.max()) <= 1.0


@pytest.mark.parametrize("dataset,setup,message", [
    ("cifar10", None, "needs a local folder"),
    ("cifar10", "empty", "lacks data_batch_1"),
    ("imagefolder", "empty", "has no train/ folder"),
    ("imagefolder", "mismatch", "classes of test/ differ"),
])
def test_image_datasets_reject_bad_roots(tmp_path, dataset, setup, message):
    root = tmp_path / "root"
    root.mkdir()
    if setup == "mismatch":
        write_imagefolder(root)
        (root / "test" / "extra").mkdir()
    args = [f"dataset={dataset}"] + ([f"dataset.datamodule.root={root}"] if setup else [])
    with pytest.raises(ConfigError, match=message):
        datamodule(tmp_path, args).check()
