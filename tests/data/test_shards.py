"""TarShards: every sample once across workers and ranks, determinism, corrupt members."""

import io
import logging
import tarfile
from collections import Counter

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dalle_fast.data import RandomResizedCrop, TarShards
from dalle_fast.data.shards import split_key


def _png(color):
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), color).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(root, shards, per_shard, ext="png"):
    """Shards `shard-NN.tar` with samples whose caption names them; returns all captions."""
    captions = []
    for s in range(shards):
        with tarfile.open(root / f"shard-{s:02d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"s{s:02d}/{i:04d}"
                caption = f"shard {s} sample {i}"
                _add(tar, f"{key}.{ext}", _png((s * 20, i * 10, 0)))
                _add(tar, f"{key}.txt", caption.encode())
                captions.append(caption)
    return captions


def _consume(dataset):
    return [caption for _, caption in dataset]


@pytest.mark.parametrize("shards,per_shard", [(6, 5), (3, 7), (1, 9)])
@pytest.mark.parametrize("shuffle_buffer", [0, 4])
def test_every_sample_once_across_workers_and_ranks(tmp_path, shards, per_shard, shuffle_buffer):
    expected = write_shards(tmp_path, shards, per_shard)
    seen = Counter()
    streams = {}
    for rank in range(2):
        for worker in range(2):
            dataset = TarShards(str(tmp_path / "*.tar"), size=8, shuffle_buffer=shuffle_buffer,
                                rank=rank, world_size=2, worker=worker, num_workers=2)
            assert dataset.consumer() == (rank * 2 + worker, 4)
            streams[rank, worker] = _consume(dataset)
            seen.update(streams[rank, worker])
    assert seen == Counter(expected)
    assert all(streams.values()) or shards * per_shard < 4


def test_epochs_reshuffle_and_repeat_exactly(tmp_path):
    expected = write_shards(tmp_path, 4, 6)
    dataset = TarShards(sorted(tmp_path.glob("*.tar")), size=8, shuffle_buffer=8, crop=RandomResizedCrop())
    first = list(dataset)
    again = list(dataset)
    assert [c for _, c in first] == [c for _, c in again]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, again))
    dataset.set_epoch(1)
    second = _consume(dataset)
    assert sorted(second) == sorted(expected) and second != [c for _, c in first]
    assert [c for _, c in first] != expected  # shuffled
    ordered = TarShards(tmp_path / "shard-00.tar", size=8, shuffle_buffer=0)
    assert _consume(ordered) == expected[:6]


def test_repeat_runs_over_epochs(tmp_path):
    expected = write_shards(tmp_path, 2, 3)
    dataset = TarShards(str(tmp_path / "*.tar"), size=8, shuffle_buffer=4, repeat=True)
    stream = iter(dataset)
    first, second = [next(stream)[1] for _ in range(6)], [next(stream)[1] for _ in range(6)]
    assert sorted(first) == sorted(second) == sorted(expected)


def test_corrupt_members_are_skipped_and_counted(tmp_path, caplog):
    with tarfile.open(tmp_path / "mixed.tar", "w") as tar:
        _add(tar, "a.jpg", _png((255, 0, 0)))  # PNG bytes named .jpg still decode
        _add(tar, "a.txt", b"first")
        _add(tar, "b.jpg", b"\xff\xd8\xff garbage")
        _add(tar, "b.txt", b"corrupt")
        _add(tar, "c.png", _png((0, 255, 0)))  # no caption
        _add(tar, "d.txt", b"no image")
        _add(tar, "e.webp", _png((0, 0, 255)))
        _add(tar, "e.json", b"{}")
        _add(tar, "e.txt", b"\n\n")  # empty caption
        _add(tar, "._f.png", b"resource fork")
        _add(tar, "f.PNG", _png((0, 0, 255)))
        _add(tar, "f.txt", b"last")
    dataset = TarShards(tmp_path / "mixed.tar", size=8, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="dalle_fast.data"):
        assert _consume(dataset) == ["first", "last"]
    assert dataset.skipped == 2 and dataset.incomplete == 2 and dataset.bad_shards == 0
    assert any(":b" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)


def test_truncated_and_non_tar_shards(tmp_path):
    write_shards(tmp_path, 1, 8)
    with tarfile.open(tmp_path / "shard-00.tar") as tar:
        cut = tar.getmembers()[8].offset_data + 10  # inside sample 4's image
    data = (tmp_path / "shard-00.tar").read_bytes()
    (tmp_path / "shard-00.tar").write_bytes(data[:cut])
    (tmp_path / "shard-01.tar").write_bytes(b"this is not a tar file" * 40)
    dataset = TarShards(str(tmp_path / "*.tar"), size=8, shuffle_buffer=0)
    captions = _consume(dataset)
    assert captions == [f"shard 0 sample {i}" for i in range(4)]
    assert dataset.bad_shards == 2


def test_gzipped_shard_and_output(tmp_path):
    with tarfile.open(tmp_path / "z.tar.gz", "w:gz") as tar:
        _add(tar, "x.png", _png((255, 255, 0)))
        _add(tar, "x.txt", b"yellow\nalso yellow")
    image, caption = next(iter(TarShards(tmp_path / "z.tar.gz", size=16)))
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert torch.allclose(image[:, 8, 8], torch.tensor([1.0, 1.0, 0.0]))
    assert caption in ("yellow", "also yellow")
    assert next(iter(TarShards(tmp_path / "z.tar.gz", size=16, all_captions=True)))[1] == "yellow\nalso yellow"


def test_dataloader_workers_split_the_shards(tmp_path):
    expected = write_shards(tmp_path, 4, 5, ext="jpg")
    dataset = TarShards(str(tmp_path / "*.tar"), size=8, shuffle_buffer=3)
    loader = DataLoader(dataset, batch_size=3, num_workers=2)
    captions = [c for _, batch in loader for c in batch]
    assert Counter(captions) == Counter(expected)


def test_rank_from_environment(tmp_path, monkeypatch):
    write_shards(tmp_path, 1, 2)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert TarShards(tmp_path / "shard-00.tar", size=8).consumer() == (3, 4)
    assert TarShards(tmp_path / "shard-00.tar", size=8, rank=1, world_size=2).consumer() == (1, 2)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="rank"):
        TarShards(tmp_path / "shard-00.tar", size=8).consumer()


def test_paths_and_arguments(tmp_path):
    write_shards(tmp_path, 2, 1)
    assert len(TarShards([tmp_path / "shard-00.tar", str(tmp_path / "*.tar")], size=8).paths) == 2
    with pytest.raises(FileNotFoundError):
        TarShards(tmp_path / "missing.tar", size=8)
    with pytest.raises(FileNotFoundError):
        TarShards(str(tmp_path / "nothing-*.tar"), size=8)
    with pytest.raises(FileNotFoundError, match="brace"):
        TarShards(str(tmp_path / "shard-{00..01}.tar"), size=8)
    with pytest.raises(ValueError):
        TarShards([], size=8)
    with pytest.raises(ValueError):
        TarShards(tmp_path / "shard-00.tar", size=7)
    with pytest.raises(ValueError):
        TarShards(tmp_path / "shard-00.tar", size=8, shuffle_buffer=-1)


def test_split_key_follows_webdataset():
    assert split_key("dir/abc.seg.JPG") == ("dir/abc", "seg.jpg")
    assert split_key("abc.txt") == ("abc", "txt")
    assert split_key("abc") == ("abc", "")


def test_training_batches_of_a_stream_change_each_epoch_and_resume_exactly(tmp_path):
    from dalle_fast.train.distributed import DistInfo
    from dalle_fast.train.loop import batches

    write_shards(tmp_path, shards=3, per_shard=5)
    dataset = lambda: TarShards(str(tmp_path / "*.tar"), size=8, shuffle_buffer=4, seed=1)
    take = lambda step, n: [b[1] for b, _ in zip(batches(dataset(), batch_size=4, seed=1, workers=0, info=DistInfo(),
                                                         step=step), range(n))]
    straight = take(0, 9)  # 15 samples: 3 batches per epoch
    assert straight[:3] != straight[3:6]  # each epoch its own order
    assert take(4, 5) == straight[4:]  # a resumed run sees what the uninterrupted one saw
    with pytest.raises(ValueError, match="no batch of 16"):
        next(batches(dataset(), batch_size=16, seed=1, workers=0, info=DistInfo(), step=0))


def test_a_repeating_stream_without_a_readable_sample_raises_instead_of_hanging(tmp_path):
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        _add(tar, "k0.png", b"not a png")
        _add(tar, "k0.txt", b"a caption")
        _add(tar, "k1.txt", b"\xef\xbb\xbfa caption without an image")
    data = TarShards(str(tmp_path / "bad.tar"), size=8, repeat=True)
    with pytest.raises(ValueError, match="no readable sample"):
        next(iter(data))
    assert data.skipped == 1 and data.incomplete == 1


def test_a_bom_is_not_part_of_the_caption(tmp_path):
    with tarfile.open(tmp_path / "bom.tar", "w") as tar:
        _add(tar, "k0.png", _png((1, 2, 3)))
        _add(tar, "k0.txt", "\ufeffa red circle".encode("utf-8"))
    assert _consume(TarShards(str(tmp_path / "bom.tar"), size=8)) == ["a red circle"]


def test_members_the_dataset_does_not_use_are_never_read_and_oversized_ones_are_skipped(tmp_path, monkeypatch,
                                                                                        caplog):
    import dalle_fast.data.shards as shards

    monkeypatch.setattr(shards, "MAX_MEMBER_BYTES", 4096)
    big = _png((0, 0, 0)) + bytes(5000)  # a valid PNG with trailing bytes: over the limit all the same
    with tarfile.open(tmp_path / "mixed.tar.gz", "w:gz") as tar:
        _add(tar, "a.png", _png((255, 0, 0)))
        _add(tar, "a.json", bytes(1 << 20))  # a decompression bomb in small: 1 MiB of zeros
        _add(tar, "a.txt", b"kept")
        _add(tar, "b.png", big)
        _add(tar, "b.txt", b"image over the limit")
        _add(tar, "c.png", _png((0, 255, 0)))
        _add(tar, "c.txt", b"caption over the limit " * 200)
        _add(tar, "d.png", _png((0, 0, 255)))
        _add(tar, "d.txt", b"also kept")
    read = []
    extract = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, m: read.append(m.name) or extract(self, m))
    dataset = TarShards(tmp_path / "mixed.tar.gz", size=8, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="dalle_fast.data"):
        assert _consume(dataset) == ["kept", "also kept"]
    assert read == ["a.png", "a.txt", "b.txt", "c.png", "d.png", "d.txt"]
    assert dataset.skipped == 2 and dataset.incomplete == 0 and dataset.bad_shards == 0
    said = [r.getMessage() for r in caplog.records]
    assert any("b.png" in m and "4096-byte limit" in m for m in said)
    assert any("c.txt" in m and "4096-byte limit" in m for m in said)


@pytest.mark.parametrize("where", ["a header", "the end blocks"])
def test_an_uncompressed_shard_cut_at_a_block_boundary_is_a_bad_shard(tmp_path, where):
    write_shards(tmp_path, 1, 4)
    with tarfile.open(tmp_path / "shard-00.tar") as tar:
        members = tar.getmembers()
        end = members[-1].offset_data + -(-members[-1].size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    cut = members[4].offset if where == "a header" else end  # before sample 2, or after every member
    assert cut % tarfile.BLOCKSIZE == 0
    data = (tmp_path / "shard-00.tar").read_bytes()
    whole = TarShards(str(tmp_path / "shard-00.tar"), size=8, shuffle_buffer=0)
    assert len(_consume(whole)) == 4 and whole.bad_shards == 0
    (tmp_path / "shard-00.tar").write_bytes(data[:cut])
    dataset = TarShards(str(tmp_path / "shard-00.tar"), size=8, shuffle_buffer=0)
    assert _consume(dataset) == [f"shard 0 sample {i}" for i in range(2 if where == "a header" else 4)]
    assert dataset.bad_shards == 1
    (tmp_path / "shard-00.tar").write_bytes(data[:end + tarfile.BLOCKSIZE])  # one end block is enough
    dataset = TarShards(str(tmp_path / "shard-00.tar"), size=8, shuffle_buffer=0)
    assert len(_consume(dataset)) == 4 and dataset.bad_shards == 0


def test_captions_that_are_not_utf8_are_skipped_and_counted(tmp_path, caplog):
    with tarfile.open(tmp_path / "text.tar", "w") as tar:
        for key, text in [("a", "un café rouge".encode("latin-1")), ("b", "a red circle".encode("utf-16")),
                          ("c", "a blue square".encode("utf-16-le")), ("d", "un café bleu".encode())]:
            _add(tar, f"{key}.png", _png((1, 2, 3)))
            _add(tar, f"{key}.txt", text)
    dataset = TarShards(str(tmp_path / "text.tar"), size=8, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="dalle_fast.data"):
        assert _consume(dataset) == ["a red circle", "un café bleu"]  # UTF-16 with its BOM is read
    assert dataset.skipped == 2 and dataset.incomplete == 0
    said = [r.getMessage() for r in caplog.records]
    assert any(":a" in m and "not UTF-8" in m for m in said) and any(":c" in m and "NUL" in m for m in said)


def test_a_double_star_glob_reaches_every_folder_level_and_an_existing_name_is_not_a_pattern(tmp_path):
    from dalle_fast.data import make_dataset

    for folder in ("", "a", "a/b", "a/b/c"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        with tarfile.open(tmp_path / folder / "one.tar", "w") as tar:
            _add(tar, "k.png", _png((1, 2, 3)))
            _add(tar, "k.txt", f"in '{folder}'".encode())
    data = TarShards(str(tmp_path / "**" / "*.tar"), size=8, shuffle_buffer=0)
    assert len(data.paths) == 4 and sorted(_consume(data)) == ["in ''", "in 'a'", "in 'a/b'", "in 'a/b/c'"]
    for name in ("shard[01].tar", "shard?.tar", "a,b.tar"):  # glob characters, a comma: still one file
        with tarfile.open(tmp_path / name, "w") as tar:
            _add(tar, "k.png", _png((1, 2, 3)))
            _add(tar, "k.txt", name.encode())
        assert _consume(make_dataset(str(tmp_path / name), 8)) == [name]
    (tmp_path / "shard0.tar").write_bytes((tmp_path / "shard[01].tar").read_bytes())
    assert TarShards(str(tmp_path / "shard[01].tar")).paths == [str(tmp_path / "shard[01].tar")]
    assert TarShards(str(tmp_path / "shard[0].tar")).paths == [str(tmp_path / "shard0.tar")]  # no such file: a glob


@pytest.mark.parametrize("samples,consumers", [(3, 4), (2, 5), (1, 3), (5, 4)])
def test_a_repeating_stream_deals_its_passes_out_so_every_consumer_gets_samples(tmp_path, samples, consumers):
    expected = write_shards(tmp_path, 1, samples)
    streams = [iter(TarShards(str(tmp_path / "*.tar"), size=8, shuffle_buffer=0, repeat=True, rank=0,
                              world_size=1, worker=c, num_workers=consumers)) for c in range(consumers)]
    # one stream of the passes dealt out round-robin: consumer c gets positions c, c + C, ...
    rounds = samples * 3
    got = [[next(stream)[1] for _ in range(rounds)] for stream in streams]
    assert got == [[expected[(c + consumers * i) % samples] for i in range(rounds)] for c in range(consumers)]
    whole = iter(TarShards(str(tmp_path / "*.tar"), size=8, shuffle_buffer=0, repeat=True))  # one consumer
    assert [next(whole)[1] for _ in range(2 * samples)] == expected * 2


def test_a_dealt_stream_whose_samples_for_a_consumer_are_all_unreadable_raises(tmp_path):
    with tarfile.open(tmp_path / "half.tar", "w") as tar:
        _add(tar, "k0.png", b"not a png")  # consumer 0 of 2 is dealt k0 on every pass: it never gets a sample
        _add(tar, "k0.txt", b"bad")
        _add(tar, "k1.png", _png((1, 2, 3)))
        _add(tar, "k1.txt", b"good")
    make = lambda worker: TarShards(str(tmp_path / "half.tar"), size=8, shuffle_buffer=0, repeat=True, rank=0,
                                    world_size=1, worker=worker, num_workers=2)
    good = iter(make(1))
    assert [next(good)[1] for _ in range(3)] == ["good"] * 3
    with pytest.raises(ValueError, match="2 whole passes in a row .* gave consumer 0 of 2 no readable sample"):
        next(iter(make(0)))


def test_the_fingerprint_changes_when_a_glob_matches_another_shard_or_a_shard_changes(tmp_path):
    write_shards(tmp_path, 2, 2)
    spec = str(tmp_path / "*.tar")
    before = TarShards(spec).fingerprint()
    assert TarShards(spec).fingerprint() == before and before.startswith("2 files, sha256 ")
    (tmp_path / "more").mkdir()
    write_shards(tmp_path / "more", 1, 1)
    assert TarShards(spec).fingerprint() == before  # not matched by the glob
    (tmp_path / "shard-09.tar").write_bytes((tmp_path / "more" / "shard-00.tar").read_bytes())
    assert TarShards(spec).fingerprint() != before
    (tmp_path / "shard-09.tar").unlink()
    assert TarShards(spec).fingerprint() == before
    with tarfile.open(tmp_path / "shard-01.tar", "a") as tar:
        _add(tar, "extra.png", _png((0, 0, 0)))
    assert TarShards(spec).fingerprint() != before
