"""Progress and metrics for the training loops: a tqdm bar on the main rank, JSON lines on disk."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from ..atomic import atomic_write, fsync_file


class Progress:
    def __init__(self, total: int, start: int, metrics_path: Path, enabled: bool, desc: str, elapsed: float = 0.0):
        """`elapsed`: the seconds of training before `start` (a resumed run's), where time_s goes on from."""
        self.enabled = enabled
        self.metrics_path = metrics_path
        self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, disable=not enabled)
        self.t0 = time.perf_counter() - elapsed

    def elapsed(self) -> float:
        """Seconds of training so far, a resumed run's earlier ones included."""
        return time.perf_counter() - self.t0

    def update(self, step: int, metrics: dict[str, float], log: bool) -> None:
        if not self.enabled:
            return
        self.bar.update(1)
        if log:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in self.bar_keys})
            record = {"step": step, "time_s": round(self.elapsed(), 3), **metrics}
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def sync(self) -> None:
        """Make the metrics lines written so far durable: a checkpoint saved after them must not
        outlive them (a power cut), since a resume never writes the lines up to its step again."""
        if self.enabled and self.metrics_path.exists():
            fsync_file(self.metrics_path)

    bar_keys = ("loss", "psnr", "perplexity", "tau", "beta", "text_loss", "image_loss", "tokens_per_s")

    def close(self) -> None:
        self.bar.close()


def read_metrics(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def drop_metrics_after(path: str | Path, step: int) -> None:
    """Keep only the records of `path` up to `step` (a resumed checkpoint's): the steps a run logged
    after its last checkpoint are logged again when it resumes from there. A line cut short by a
    crash mid-write goes too. Rewritten atomically: a crash now keeps the old file whole."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", step + 1) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.writelines(kept)

    atomic_write(path, write)
