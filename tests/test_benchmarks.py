"""The benchmark scripts still run and write what they promise (no timing is checked here)."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dalle_fast.ops._backend import has_kernels

REPO = Path(__file__).resolve().parent.parent


def _bench_module(name, monkeypatch):
    """benchmarks/<name>.py imported in this process (for monkeypatched runs of its main); the
    sys.path entries it adds are undone after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_attention_quick_writes_json(tmp_path):
    out = tmp_path / "attention.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_attention.py"), "--device", "cpu", "--quick",
         "--kinds", "row,conv", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"row", "conv"}
    assert "ours" in data["results"]["row"]["methods"]
    assert data["environment"]
    # ours not run (here: the CPU kernels take no float16) is no clean run: gpu_check reads the exit code
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_attention.py"), "--device", "cpu", "--quick",
         "--kinds", "row", "--dtype", "float16", "--json", str(tmp_path / "f16.json")],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 1 and "ours is skipped" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]


def test_the_load_monitor_counts_its_own_child_processes_as_its_own():
    from benchmarks.common import LoadMonitor

    with LoadMonitor() as load:  # a compiler run of torch.compile, say: this benchmark's work, not another's
        busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1: pass"
        subprocess.run([sys.executable, "-c", busy], check=True)
    assert load.result()["self_cpu_s"] >= 0.9


def test_bench_gumbel_quick_writes_json(tmp_path):
    out = tmp_path / "gumbel.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_gumbel.py"), "--device", "cpu", "--quick", "--no-compile",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    data = json.loads(out.read_text())
    methods = data["results"][0]["methods"]
    assert {"ours", "F.gumbel_softmax"} <= set(methods)
    accuracy = data["results"][0]["accuracy"]
    assert accuracy["ok"] and accuracy["max_abs_err"] < 1e-5
    assert accuracy["backward"]["ok"] and accuracy["backward"]["max_abs_err"] < 1e-5
    assert data["environment"]["dalle_fast_switches"] == {}


@pytest.mark.skipif(not has_kernels(), reason="needs the compiled ops")
def test_bench_gumbel_refuses_a_wrong_backward(monkeypatch, tmp_path):
    # The reviewer's mutation: a backward that returns zeros passed the forward-only check and was timed.
    bench = _bench_module("bench_gumbel", monkeypatch)
    real = bench.ops.gumbel_softmax

    def zero_backward(x, tau=1.0, dim=1, hard=False, generator=None):
        return real(x.detach(), tau, dim, hard, generator) + 0 * x  # the same sample, gradient 0

    x = torch.randn(2, 64, 4, 4) * 2
    dy = torch.randn_like(x)
    with bench.ops.backend("cpu"):
        assert bench.check_ours(x, dy, 1.0)["backward"]["ok"] is True
        monkeypatch.setattr(bench.ops, "gumbel_softmax", zero_backward)
        check = bench.check_ours(x, dy, 1.0)
    assert check["ok"] is True and check["backward"]["ok"] is False  # the forward alone cannot tell
    out = tmp_path / "g.json"
    with pytest.raises(SystemExit, match="gradient is off the formula"):
        bench.main(["--device", "cpu", "--quick", "--no-compile", "--json", str(out)])
    assert not out.exists()  # no figure of a wrong op


def test_bench_sampling_quick_draws_the_same_tokens_everywhere(tmp_path):
    out = tmp_path / "sampling.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_sampling.py"), "--device", "cpu", "--quick",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"ours", "ours_torch_linear", "dense_kv", "recompute"}
    assert data["skipped"] == {}
    assert all(r["ms_per_token"] > 0 for r in data["results"].values())
    # ours' variant (its linear layers as F.linear) is checked by its step logits and valid tokens
    assert all(data["results"][name]["same_tokens_first_rows"] for name in ("ours", "dense_kv", "recompute"))
    assert data["results"]["ours_torch_linear"]["valid_tokens"]
    # step logits against the full forward pass, every position of the tiny grid
    for name in ("ours", "ours_torch_linear", "dense_kv"):
        (check,) = data["results"][name]["step_logits"]["checks"]
        assert check["ok"] and check["positions"] == 64 and check["max_abs_err"] < 1e-5, (name, check)


def test_bench_sampling_step_check_sees_a_dropped_key(monkeypatch):
    # The reviewer's mutation: dropping each step's own key changed the logits by ~1e-2 and still
    # drew the same first-row tokens; the step check against the full forward pass sees it.
    bench = _bench_module("bench_sampling", monkeypatch)
    from dalle_fast import sampler

    class Args:
        quick, device, batch = True, "cpu", 0

    prior, text, _ = bench.build(Args)
    ref = bench.full_pass(prior, text)
    spans = bench.checked_positions(prior.config.grid, 2)
    assert spans == [(0, 16), (48, 64)]

    def make():
        return sampler.IncrementalPrior(prior, text.shape[0])

    assert bench.check_steps(make, text, ref, spans, 0.0, "float32")["ok"]
    offsets = sampler.key_offsets
    monkeypatch.setattr(sampler, "key_offsets", lambda kind, grid, kernel: offsets(kind, grid, kernel)[1:])
    check = bench.check_steps(make, text, ref, spans, 0.0, "float32")
    assert not check["ok"] and check["max_abs_err"] > 100 * check["tol"], check


def test_bench_sampling_refuses_to_time_a_wrong_sampler(monkeypatch, tmp_path):
    # The reviewer's mutation: our attention output times 3. Ours was the yardstick of the token
    # check, so the baselines were blamed and ours timed with rc 0.
    bench = _bench_module("bench_sampling", monkeypatch)
    from dalle_fast import sampler

    attend = sampler.IncrementalPrior.attend
    monkeypatch.setattr(sampler.IncrementalPrior, "attend", lambda self, *args, **kw: attend(self, *args, **kw) * 3)
    out = tmp_path / "s.json"
    assert bench.main(["--device", "cpu", "--quick", "--check-rows", "1", "--json", str(out)]) == 1
    data = json.loads(out.read_text())
    # ours and its variant (its linear layers as F.linear) share the broken attention
    assert set(data["skipped"]) == {"ours", "ours_torch_linear"} and "step logits" in data["skipped"]["ours"]
    for name in ("ours", "ours_torch_linear"):
        assert data["results"][name]["step_logits"]["ok"] is False and "ms_per_token" not in data["results"][name]
    for name in ("dense_kv", "recompute"):  # checked against the reference, not against ours: still timed
        assert data["results"][name]["same_tokens_first_rows"] and data["results"][name]["ms_per_token"] > 0


def test_plot_results_draws_the_newest_run_of_each_benchmark(tmp_path):
    # A fixed set of the committed runs, so that a newer run committed later does not change the answer.
    results = tmp_path / "results"
    results.mkdir()
    for name in ("attention_cpu_20261126-130852", "attention_cpu_20261126-144121", "attention_cuda_20261127-074006",
                 "attention_cuda_20261127-075723", "attention_cuda_20261127-080717_b32", "gumbel_cpu_20261128-104352",
                 "gumbel_cuda_20261127-075818", "sampling_cpu_20261127-170343", "sampling_cuda_20261127-080631"):
        shutil.copy(REPO / "benchmarks" / "results" / f"{name}.json", results)
    # a newer run with a kernel switched off (its "ours" is not our full kernels): left out
    switched = json.loads((results / "gumbel_cpu_20261128-104352.json").read_text())
    switched["environment"]["date"] = "2026-12-01T00:00:00+00:00"
    switched["environment"]["dalle_fast_switches"] = {"DALLE_FAST_GUMBEL_RESIDENT": "0"}
    (results / "gumbel_cpu_switched.json").write_text(json.dumps(switched))
    # newer runs of another setting than the default one (one thread, another kernel; fewer recomputed steps)
    for source, name, flags in (("attention_cpu_20261126-144121", "attention_cpu_threads1", ["--threads", "1"]),
                                ("attention_cpu_20261126-144121", "attention_cpu_kernel3", ["--kernel=3"]),
                                ("sampling_cpu_20261127-170343", "sampling_cpu_rs16", ["--recompute-steps", "16"])):
        other = json.loads((results / f"{source}.json").read_text())
        other["environment"]["date"] = "2026-12-01T00:00:00+00:00"
        other["argv"] = list(other.get("argv") or []) + flags
        (results / f"{name}.json").write_text(json.dumps(other))
    out = tmp_path / "plots"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "plot_results.py"), "--results", str(results),
                             "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == {f"{b}_{d}.png" for b in ("attention", "gumbel", "sampling")
                                               for d in ("cpu", "cuda")}
    assert "attention_cpu_20261126-144121.json" in result.stdout  # the newer of the two attention runs
    # the newest CUDA attention run at the default shape, not the newer --batch 32 one
    assert "attention_cuda_20261127-075723.json" in result.stdout
    assert "sampling_cpu_20261127-170343.json" in result.stdout and "_threads1" not in result.stdout
    assert "_kernel3" not in result.stdout and "_rs16" not in result.stdout
    assert "gumbel_cpu_20261128-104352.json" in result.stdout and "gumbel_cpu_switched.json" not in result.stdout
    assert "gumbel_cpu_switched.json: left out" in result.stderr
    empty = subprocess.run([sys.executable, str(REPO / "benchmarks" / "plot_results.py"), "--results", str(tmp_path)],
                           capture_output=True, text=True, timeout=300, cwd=REPO)
    assert empty.returncode == 1 and "no benchmark results" in empty.stderr


def test_plot_titles_flag_contended_runs_of_every_benchmark(monkeypatch):
    # The benchmarks record the machine's load as "machine_load" (attention, gumbel, prior) or
    # "load" (sampling); a plot of a contended CPU run says so in its title, whichever it is.
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # its check_targets import, as when run as a script
    plot_results = _bench_module("plot_results", monkeypatch)
    results = REPO / "benchmarks" / "results"
    for name, key in (("attention_cpu_20261126-144121", "machine_load"), ("gumbel_cpu_20261128-104352", "machine_load"),
                      ("sampling_cpu_20261127-170343", "load")):
        data = json.loads((results / f"{name}.json").read_text())
        assert "contended" not in plot_results.subtitle(data, name)
        data[key]["others_avg_cpus"] = 1.2
        assert "contended" in plot_results.subtitle(data, name), name
    # A GPU run's figures are the GPU's, however busy its host's CPUs were.
    data = json.loads((results / "gumbel_cuda_20261127-075818.json").read_text())
    data["machine_load"]["others_avg_cpus"] = 1.2
    assert "contended" not in plot_results.subtitle(data, "gumbel_cuda")


def test_source_digest_follows_the_sources(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import common
    finally:
        sys.path.pop(0)
    (tmp_path / "csrc").mkdir()
    (tmp_path / "dalle_fast").mkdir()
    (tmp_path / "csrc" / "k.cu").write_text("a")
    (tmp_path / "dalle_fast" / "m.py").write_text("b")
    (tmp_path / "notes.txt").write_text("not source")
    first = common.source_digest(tmp_path)
    assert common.source_digest(tmp_path) == first
    (tmp_path / "notes.txt").write_text("changed")
    assert common.source_digest(tmp_path) == first
    (tmp_path / "csrc" / "k.cu").write_text("a2")
    assert common.source_digest(tmp_path) != first


def _sass_budget():
    spec = importlib.util.spec_from_file_location("sass_budget", REPO / "benchmarks" / "sass_budget.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sass_budget_finds_the_tile_path_and_reads_the_tools_output():
    # The script forces each one-read kernel's tile path by rewriting this line of its source.
    sb = _sass_budget()
    for rel, _ in sb.KERNELS.values():
        assert sb.PATH_LINE in (REPO / "csrc" / rel).read_text(), rel
    sass = """
\t.section\t.text.k,"ax",@progbits
.text._Z6kernelI13__nv_bfloat16Lb1EEvv:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/              @!P1 IMAD.WIDE.U32 R4, R5, -0x2daee0ad, RZ ;
        /*0020*/                   NOP ;
        /*0030*/               @P0 LDG.E R2, desc[UR4][R2.64] ;
"""
    counts = sb.parse_sass(sass)
    assert counts == {"_Z6kernelI13__nv_bfloat16Lb1EEvv": {"LDC": 1, "IMAD": 1, "LDG": 1}}
    assert sb.kernel_variant("resident_kernelI13__nv_bfloat16Lb1EEEvNS_") == ("bfloat16", "Lb1")
    log = ("ptxas info    : Compiling entry function '_Z1kv' for 'sm_90a'\n"
           "ptxas info    : Function properties for _Z1kv\n"
           "    36 bytes stack frame, 36 bytes spill stores, 40 bytes spill loads\n"
           "ptxas info    : Used 128 registers\n")
    assert sb.ptxas_stats(log) == {"_Z1kv": {"spill_store_bytes": 36, "registers": 128}}


def _check_targets(*paths):
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "check_targets.py"), *map(str, paths)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_check_targets_judges_the_saved_runs():
    results = REPO / "benchmarks" / "results"
    run = _check_targets(results / "gumbel_cuda_20261127-075818.json", results / "sampling_cuda_20261127-080631.json",
                         results / "sampling_cpu_20261127-170343.json", results / "attention_cpu_20261126-144121.json")
    assert run.returncode == 1, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert "FAIL  issue 4: H100 forward <= 1.1 ms: 2.795 ms  [gumbel_cuda_20261127-075818.json]" in lines
    assert any(line.startswith("PASS  issue 4: H100 forward faster than torch.compile") for line in lines)
    # these runs recorded no gradient check (Gumbel) and no step-logits check (sampling): not judged
    assert any(line.startswith("NOT JUDGED  issue 4: H100 forward+backward <= 3 ms: 4.628 ms")
               and "gradient check not recorded" in line for line in lines)
    assert any(line.startswith("NOT JUDGED  issue 7: H100 1024 tokens x batch 16 in < 500 ms: 595.8 ms")
               and "step-logits check not recorded" in line for line in lines)
    assert any(line.startswith("NOT JUDGED  issue 7: CPU ours >= 10x faster than recompute") for line in lines)
    assert len(lines) == 7  # 5 Gumbel targets, 2 sampling ones; the attention run decides nothing


def _verified(gumbel=None, sampling=None):
    """Copies of saved runs as today's scripts write them: with the gradient and step-logits checks."""
    if gumbel is not None:
        gumbel["results"][0]["accuracy"]["backward"] = {"ok": True}
    if sampling is not None:
        sampling["results"]["ours"]["step_logits"] = {"ok": True, "checks": []}


def test_check_targets_passes_a_run_that_meets_every_target(tmp_path):
    results = REPO / "benchmarks" / "results"
    gumbel = json.loads((results / "gumbel_cuda_20261127-075818.json").read_text())
    ours = gumbel["results"][0]["methods"]["ours"]
    ours["fwd"]["median_ms"], ours["fwd_bwd"]["median_ms"], ours["fwd_gbps"] = 1.0, 2.9, 2150.0
    sampling = json.loads((results / "sampling_cuda_20261127-080631.json").read_text())
    sampling["results"]["ours"]["ms_per_batch"] = 499.0
    _verified(gumbel, sampling)

    def judge(g=None, s=None):
        paths = []
        for name, data in (("g.json", g), ("s.json", s)):
            if data is not None:
                (tmp_path / name).write_text(json.dumps(data))
                paths.append(tmp_path / name)
        return _check_targets(*paths)

    run = judge(gumbel, sampling)
    assert run.returncode == 0 and run.stdout.count("PASS") == 6 and "FAIL" not in run.stdout, run.stdout
    gumbel["results"][0]["accuracy"]["backward"]["ok"] = False  # a wrong gradient: the fwd+bwd targets fail
    run = judge(gumbel)
    assert run.returncode == 1 and run.stdout.count("FAIL") == 2 and run.stdout.count("PASS") == 3, run.stdout
    assert "the gradient check failed" in run.stdout
    del gumbel["results"][0]["accuracy"]["backward"]  # a run before the gradient check: not judged, not a pass
    run = judge(gumbel)
    assert run.returncode == 2 and run.stdout.count("NOT JUDGED") == 2 and run.stdout.count("PASS") == 3, run.stdout
    gumbel["results"][0]["accuracy"]["ok"] = False  # a fast but wrong kernel passes nothing
    run = judge(gumbel)
    assert run.returncode == 1 and run.stdout.count("FAIL") == 5, run.stdout
    del gumbel["results"][0]["accuracy"]  # unrecorded accuracy: unverified, not a pass
    run = judge(gumbel)
    assert run.returncode == 2 and run.stdout.count("NOT JUDGED") == 5 and "unverified" in run.stdout, run.stdout

    sampling["results"]["ours"]["step_logits"]["ok"] = False  # ours' step logits off the full forward pass
    run = judge(s=sampling)
    assert run.returncode == 1 and "FAIL" in run.stdout and "step-logits check failed" in run.stdout, run.stdout
    del sampling["results"]["ours"]["step_logits"]
    run = judge(s=sampling)
    assert run.returncode == 2 and "NOT JUDGED" in run.stdout and "not recorded" in run.stdout, run.stdout

    cpu = json.loads((results / "sampling_cpu_20261127-170343.json").read_text())
    _verified(sampling=cpu)
    cpu["load"]["others_avg_cpus"] = 1.2  # other processes competed for the CPUs: the ratio decides nothing
    (tmp_path / "c.json").write_text(json.dumps(cpu))
    run = _check_targets(tmp_path / "c.json")
    assert run.returncode == 2 and "NOT JUDGED" in run.stdout and "contended" in run.stdout, run.stdout
    run = _check_targets(results / "attention_cpu_20261126-144121.json")
    assert run.returncode == 2 and "no target decided" in run.stderr
    # a baseline the run did not time (--methods without it, or it failed) says nothing about ours
    cpu["load"]["others_avg_cpus"] = 0.0
    del cpu["results"]["recompute"]
    (tmp_path / "c.json").write_text(json.dumps(cpu))
    run = _check_targets(tmp_path / "c.json")
    assert run.returncode == 2 and run.stdout.startswith("NOT JUDGED") and "baseline recompute is not in" in run.stdout
    gumbel = json.loads((results / "gumbel_cuda_20261127-075818.json").read_text())
    ours = gumbel["results"][0]["methods"]["ours"]
    ours["fwd"]["median_ms"], ours["fwd_bwd"]["median_ms"], ours["fwd_gbps"] = 1.0, 2.9, 2150.0
    _verified(gumbel)
    del gumbel["results"][0]["methods"]["torch.compile(formula)"]
    run = judge(gumbel)
    assert run.returncode == 2 and run.stdout.count("NOT JUDGED") == 2 and "FAIL" not in run.stdout, run.stdout


def test_check_targets_does_not_judge_another_gpu_against_h100_targets(tmp_path):
    # The device tool often lends an H200: its figures are printed as informational, the exit code says so.
    results = REPO / "benchmarks" / "results"
    gumbel = json.loads((results / "gumbel_cuda_20261127-075818.json").read_text())
    sampling = json.loads((results / "sampling_cuda_20261127-080631.json").read_text())
    _verified(gumbel, sampling)
    for data in (gumbel, sampling):
        data["environment"]["device_name"] = data["environment"]["gpu"]["name"] = "NVIDIA H200"
    (tmp_path / "g.json").write_text(json.dumps(gumbel))
    (tmp_path / "s.json").write_text(json.dumps(sampling))
    run = _check_targets(tmp_path / "g.json", tmp_path / "s.json")
    assert run.returncode == 2, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 6 and all(line.startswith("NOT JUDGED") and "device NVIDIA H200" in line for line in lines)
    assert "595.8 ms" in run.stdout  # the figure is still shown
    gumbel["results"][0]["accuracy"]["ok"] = False  # a wrong result fails on any device
    (tmp_path / "g.json").write_text(json.dumps(gumbel))
    assert _check_targets(tmp_path / "g.json").returncode == 1


def test_check_targets_does_not_judge_a_run_with_a_kernel_switched_off(tmp_path):
    # gpu_check's fallbacks (sampling_safe, gumbel_two_sweep) time "ours" without a kernel: their
    # figures must not pass (or fail) a target as ours, but a wrong result still fails.
    results = REPO / "benchmarks" / "results"
    sampling = json.loads((results / "sampling_cuda_20261127-080631.json").read_text())
    sampling["results"]["ours"]["ms_per_batch"] = 499.0
    _verified(sampling=sampling)
    sampling["environment"]["dalle_fast_switches"] = {"DALLE_FAST_SKINNY_LINEAR": "0", "DALLE_FAST_FLASH": "1"}
    (tmp_path / "s.json").write_text(json.dumps(sampling))
    run = _check_targets(tmp_path / "s.json")
    assert run.returncode == 2 and run.stdout.startswith("NOT JUDGED"), run.stdout
    assert "DALLE_FAST_SKINNY_LINEAR=0: not our full kernels" in run.stdout and "FLASH" not in run.stdout
    sampling["results"]["ours"]["step_logits"]["ok"] = False
    (tmp_path / "s.json").write_text(json.dumps(sampling))
    run = _check_targets(tmp_path / "s.json")
    assert run.returncode == 1 and run.stdout.startswith("FAIL"), run.stdout


def test_environment_records_the_kernel_switches(monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import common
    finally:
        sys.path.pop(0)
    monkeypatch.setenv("DALLE_FAST_GUMBEL_RESIDENT", "0")
    monkeypatch.setenv("DALLE_FAST_CUDA", "0")  # the build's, not a kernel switch: a CPU-only build's run is whole
    env = common.environment("cpu")
    assert env["dalle_fast_switches"] == {"DALLE_FAST_GUMBEL_RESIDENT": "0"}
    assert "switches: DALLE_FAST_GUMBEL_RESIDENT=0" in common.describe(env)
    assert set(common._nvidia_driver()) == {"driver_version", "driver_cuda_version"}
