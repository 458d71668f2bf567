"""The check every training loop's resume test makes, and an earlier run for the others to leave alone."""

from pathlib import Path

import torch

from dalle_fast.checkpoint import read_checkpoint
from dalle_fast.train.progress import read_metrics


def earlier_run(out: Path) -> dict[str, bytes]:
    """Files of an earlier run written into `out` (made); returns them, to compare with `run_files`."""
    out.mkdir(parents=True)
    files = {"checkpoint.safetensors": b"earlier weights", "metrics.jsonl": b'{"step": 1}\n', "config.json": b"{}"}
    for name, data in files.items():
        (out / name).write_bytes(data)
    return files


def run_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir()}


def three_pairs(folder: Path, size: int) -> Path:
    """A folder dataset of three image-caption pairs."""
    from PIL import Image

    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (size, size), (40 * i, 0, 0)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a red square number {i}")
    return folder


def assert_same_run(straight: Path, split: Path, keys: tuple[str, ...], steps: int) -> tuple[list, dict]:
    """An interrupted-and-resumed run (`split`) logged the same `keys` at every step and ended with
    the same weights, optimizer state and RNG state as an uninterrupted one (`straight`).
    Returns the straight run's metrics and its checkpoint info."""
    a_metrics = read_metrics(straight / "metrics.jsonl")
    b_metrics = read_metrics(split / "metrics.jsonl")
    assert [m["step"] for m in b_metrics] == [m["step"] for m in a_metrics] == list(range(1, steps + 1))
    for a, b in zip(a_metrics, b_metrics):
        for key in keys:
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    w1, info = read_checkpoint(straight / "checkpoint.safetensors")
    w2, _ = read_checkpoint(split / "checkpoint.safetensors")
    assert w1.keys() == w2.keys()
    for key in w1:
        assert torch.equal(w1[key], w2[key]), key
    return a_metrics, info
