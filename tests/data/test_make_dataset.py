"""make_dataset: the `--data` string to a dataset, and clear errors otherwise."""

import tarfile

import pytest

from dalle_fast.data import (ImageTextFolder, RandomResizedCrop, ShapesDataset, TarShards,
                             export_folder, make_dataset)


def test_shapes_specs():
    train = make_dataset("shapes", 32, seed=2, length=10)
    assert isinstance(train, ShapesDataset) and train.split == "train"
    assert (train.size, train.seed, len(train)) == (32, 2, 10)
    assert make_dataset("shapes:train", 16).split == "train"
    test = make_dataset(" shapes:test ", 16, crop=RandomResizedCrop())
    assert isinstance(test, ShapesDataset) and test.split == "test"


def test_folder_and_tar_specs(tmp_path):
    export_folder(ShapesDataset("train", 16, length=2), tmp_path / "folder")
    folder = make_dataset(str(tmp_path / "folder"), 16, crop=RandomResizedCrop(), seed=3)
    assert isinstance(folder, ImageTextFolder) and len(folder) == 2 and folder.crop is not None
    for name in ("a.tar", "b.tar"):
        with tarfile.open(tmp_path / name, "w") as tar:
            tar.add(tmp_path / "folder" / "000000.png", arcname="x.png")
            tar.add(tmp_path / "folder" / "000000.txt", arcname="x.txt")
    single = make_dataset(str(tmp_path / "a.tar"), 16)
    assert isinstance(single, TarShards) and len(single.paths) == 1
    assert len(make_dataset(str(tmp_path / "*.tar"), 16).paths) == 2
    both = make_dataset(f"{tmp_path / 'a.tar'},{tmp_path / 'b.tar'}", 16, shuffle_buffer=0)
    assert len(both.paths) == 2 and both.shuffle_buffer == 0
    assert len(list(both)) == 2


@pytest.mark.parametrize("spec,error,match", [
    ("shapes:val", ValueError, "split"),
    ("does/not/exist", ValueError, "no such directory"),
    ("data-*.zip", ValueError, "not a dataset"),
    ("missing-*.tar", FileNotFoundError, "no files match"),
])
def test_errors(tmp_path, monkeypatch, spec, error, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=match):
        make_dataset(spec, 32)


def test_more_errors(tmp_path):
    (tmp_path / "list.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="not a dataset"):
        make_dataset(str(tmp_path / "list.csv"), 32)
    with pytest.raises(ValueError, match="no image-caption pairs"):
        make_dataset(str(tmp_path), 32)
    with pytest.raises(ValueError, match="size"):
        make_dataset("shapes", 4)
    with pytest.raises(TypeError):
        make_dataset(None, 32)


def test_directory_of_shards_hints_at_a_glob(tmp_path):
    with tarfile.open(tmp_path / "a.tar", "w"):
        pass
    with pytest.raises(ValueError, match=r"a\.tar|\*\.tar"):
        make_dataset(str(tmp_path), 32)


def test_symlink_cycle_is_scanned_once(tmp_path):
    export_folder(ShapesDataset("train", 16, length=2), tmp_path / "d")
    (tmp_path / "d" / "loop").symlink_to(tmp_path / "d")
    assert len(make_dataset(str(tmp_path / "d"), 16)) == 2
