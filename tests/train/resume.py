"""The check every training loop's resume test makes."""

from pathlib import Path

import torch

from dalle_fast.checkpoint import read_checkpoint
from dalle_fast.train.progress import read_metrics


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
