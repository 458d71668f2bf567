"""benchmarks/bench_prior.py runs end to end and writes what it promises (no timing is checked here)."""

import json
import subprocess
import sys
from pathlib import Path

import dalle_fast

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

    # ours and the exact dense mask agree before anything is timed, and both are timed
    assert methods["ours"]["status"] == "ok"
    sdpa = methods["sdpa_mask"]
    assert sdpa["status"] == "ok"
    assert sdpa["check"]["ok"] is True
    assert sdpa["check"]["loss_diff_vs_ours"] <= sdpa["check"]["loss_tol"]
    assert sdpa["check"]["grad_rel_err_vs_ours"] <= sdpa["check"]["grad_rel_tol"]
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
