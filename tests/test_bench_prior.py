"""benchmarks/bench_prior.py runs end to end and writes what it promises (no timing is checked here)."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import dalle_fast
from dalle_fast import ops

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "bench_prior.py"
METHODS = {"ours", "sdpa_causal", "sdpa_mask", "flex"}


def _run(tmp_path, *extra):
    out = tmp_path / "prior.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--json", str(out), *extra],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads(out.read_text()), result.stdout


def test_bench_prior_quick_writes_json(tmp_path):
    # Every method, flex included: on CPU it either trains or is skipped with the reason (torch 2.14:
    # "FlexAttention does not support backward on CPU"), found out in seconds.
    data, stdout = _run(tmp_path)
    methods = data["results"]["methods"]
    assert set(methods) == METHODS
    for name, r in methods.items():
        if r["status"] == "ok":
            assert r["ms_per_step"] > 0 and r["tokens_per_s"] > 0, name
            assert len(r["step"]["samples_ms"]) == 2, name  # --quick: 2 rounds
            assert r["check"]["ok"] is True, name
        else:
            assert r["status"] == "skipped" and r["why"], (name, r)

    # ours and the exact dense mask agree with the reference backend before anything is timed, and both are timed
    for name in ("ours", "sdpa_mask"):
        r = methods[name]
        assert r["status"] == "ok" and r["check"]["ok"] is True, name
        assert r["check"]["loss_diff_vs_reference"] <= r["check"]["loss_tol"], name
        assert r["check"]["grad_rel_err_vs_reference"] <= r["check"]["grad_rel_tol"] == 1e-3, name
    assert data["results"]["reference"]["own_loss_err"] == 0.0  # float32: the tolerance is the floor alone
    assert methods["sdpa_causal"]["status"] == "ok" and "loss" in methods["sdpa_causal"]["check"]
    if dalle_fast.ops._backend.has_kernels():
        assert methods["ours"]["check"]["kernel_fallback"] == []
    tokens = data["model"]["N"] * data["batch"]
    assert abs(methods["ours"]["tokens_per_s"] - tokens / (methods["ours"]["ms_per_step"] / 1e3)) < 1e-6 * tokens
    assert set(data["results"]["speedup_of_ours"]) == {n for n in ("sdpa_causal", "sdpa_mask", "flex")
                                                      if methods[n]["status"] == "ok"}
    assert "memory" in methods["ours"] and methods["ours"]["memory"]["measured"] is False  # CPU: not measured

    env = data["environment"]
    assert env["torch"] and env["python"] and env["device_name"] and env["cpu"]["logical_cpus"]
    assert "dalle_fast" in env and "git" in env
    assert data["machine_load"]["wall_s"] > 0
    assert data["config"]["device"] == "cpu" and data["dtype"] == "float32"
    assert "ms/step" in stdout


def test_bench_prior_methods_flag(tmp_path):
    data, _ = _run(tmp_path, "--methods", "sdpa_mask")
    methods = data["results"]["methods"]
    assert set(methods) == METHODS
    assert methods["ours"]["status"] == "ok" and methods["sdpa_mask"]["status"] == "ok"  # ours always runs
    for name in ("sdpa_causal", "flex"):
        assert methods[name] == {"status": "skipped", "why": "not selected (--methods)"}


@pytest.mark.skipif(not dalle_fast.ops._backend.has_kernels(), reason="needs the compiled ops")
def test_bench_prior_checks_ours_against_the_reference(monkeypatch, tmp_path):
    # The reviewer's mutation: our kernel called with half the scale. Ours was the yardstick, so
    # `--methods ours` timed it with rc 0 and with sdpa_mask the message blamed the baseline.
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location("bench_prior", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_prior", bench)
    spec.loader.exec_module(bench)
    real = ops.sparse_attention

    def half_scale(q, k, v, kind, text_len, grid, kernel=11, scale=None):
        if ops.current_backend() == "reference":
            return real(q, k, v, kind, text_len, grid, kernel, scale)
        return real(q, k, v, kind, text_len, grid, kernel, 0.5 / math.sqrt(q.shape[-1]))

    monkeypatch.setattr(ops, "sparse_attention", half_scale)
    out = tmp_path / "prior.json"
    rc = bench.main(["--quick", "--device", "cpu", "--methods", "ours,sdpa_mask", "--repeats", "1", "--warmup", "0",
                     "--json", str(out)])
    data = json.loads(out.read_text())
    methods = data["results"]["methods"]
    assert rc == 1
    assert methods["ours"]["status"] == "mismatch" and "ours is off the reference" in methods["ours"]["why"]
    assert "ms_per_step" not in methods["ours"]
    assert methods["sdpa_mask"]["status"] == "ok" and methods["sdpa_mask"]["ms_per_step"] > 0  # not blamed
    assert any(p.startswith("ours is mismatch") for p in data["problems"])
