"""The dVAE loop end to end on tiny data: exact resume, checkpoints, torchrun."""

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dalle_fast.dvae import DVAE, DVAEConfig
from dalle_fast.checkpoint import load_checkpoint, load_model, read_checkpoint, rng_tensors, save_checkpoint
from dalle_fast.train.distributed import DistInfo
from dalle_fast.train.loop import TrainingRun
from dalle_fast.train.progress import read_metrics
from dalle_fast.train.sampler import ResumableSampler
from dalle_fast.train.vae import TrainVAEConfig, train_vae

from .resume import assert_same_run, earlier_run, run_files, three_pairs

REPO = Path(__file__).resolve().parents[2]


def tiny(out, **kw) -> TrainVAEConfig:
    base = dict(data="shapes", out=str(out), preset="tiny", steps=6, batch_size=4, log_every=1, sample_every=3,
                save_every=100, seed=3, device="cpu")
    return TrainVAEConfig(**(base | kw))


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path):
    recipe = dict(usage=0.1, mse=100.0, logit_init=10.0)  # the bundled model's options (scripts/recipe_shapes.sh)
    train_vae(tiny(tmp_path / "straight", **recipe))
    train_vae(tiny(tmp_path / "split", run_steps=3, **recipe))
    assert read_metrics(tmp_path / "split" / "metrics.jsonl")[-1]["step"] == 3
    train_vae(tiny(tmp_path / "split", resume=True, **recipe))
    assert_same_run(tmp_path / "straight", tmp_path / "split",
                    ("loss", "nll", "kl", "usage_kl", "mse", "psnr", "perplexity", "tau", "beta", "lr"), steps=6)
    assert (tmp_path / "straight" / "recon_final.png").exists()


def test_resume_drops_the_metrics_logged_after_its_checkpoint(tmp_path):
    train_vae(tiny(tmp_path / "straight"))
    split = tmp_path / "split"
    train_vae(tiny(split, run_steps=2))
    at_two = (split / "checkpoint.safetensors").read_bytes()
    train_vae(tiny(split, resume=True, run_steps=2))
    # a crash after step 4 was logged but before its checkpoint, mid-way through writing step 5's line
    (split / "checkpoint.safetensors").write_bytes(at_two)
    with open(split / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.')
    train_vae(tiny(split, resume=True))
    assert_same_run(tmp_path / "straight", split, ("loss", "nll", "psnr"), steps=6)


def test_logit_init_scales_the_encoder_output_at_initialisation(tmp_path):
    paths = {}
    for scale in (1.0, 4.0):
        paths[scale] = train_vae(tiny(tmp_path / str(scale), steps=1, lr=1e-12, lr_end=1e-12, logit_init=scale))
    w1, _ = read_checkpoint(paths[1.0])
    w4, _ = read_checkpoint(paths[4.0])
    key = "model.encoder.blocks.output.conv.weight"
    torch.testing.assert_close(w4[key], 4.0 * w1[key], rtol=1e-5, atol=1e-7)
    # a run folder stands for its checkpoint
    from_folder = load_model(tmp_path / "4.0", DVAE, DVAEConfig)
    torch.testing.assert_close(from_folder.encoder.blocks.output.conv.weight, w4["ema.module." + key[len("model."):]])
    with pytest.raises(ValueError, match="--logit-init"):
        train_vae(tiny(tmp_path / "bad", logit_init=0.0))


@pytest.mark.parametrize("option, value, message", [
    ("tau_end", 0.0, "--tau-end must be positive"), ("lr_end", -1e-3, "--lr-end must be >= 0"),
    ("ema", 1.5, r"--ema must be in \[0, 1\]"), ("sample_every", 0, "--sample-every must be positive"),
    ("log_every", 0, "--log-every must be positive"), ("save_every", 0, "--save-every must be positive"),
    ("lr", float("nan"), "--lr must be a finite number"),
    # the flag's name, not the config field's
    ("steps", 0, "--steps must be positive"), ("batch_size", 0, "--batch-size must be positive"),
    ("logit_init", 0.0, "--logit-init must be positive"), ("palette_images", 0, "--palette-images must be positive"),
])
def test_out_of_range_options_fail_before_training(tmp_path, option, value, message):
    with pytest.raises(ValueError, match=message):
        train_vae(tiny(tmp_path / "bad", **{option: value}))
    assert not (tmp_path / "bad").exists()  # refused before the run folder was made


def test_factored_run_starts_the_colour_codes_at_the_datas_palette(tmp_path):
    path = train_vae(tiny(tmp_path / "f", steps=1, lr=1e-12, lr_end=1e-12, logit_init=10.0, colour_codes=4,
                          palette_images=16))
    weights, _ = read_checkpoint(path)
    w, b = weights["model.encoder.colour.weight"][:, :, 0, 0], weights["model.encoder.colour.bias"]
    palette = w / (2 * 10.0)  # logit k = -10 |hue - palette_k|^2 + a term equal for every k
    torch.testing.assert_close(b, -10.0 * palette.pow(2).sum(1), rtol=1e-4, atol=1e-4)
    # on shapes (4 centres for 7 hues here): one centre near the black background, others on bright colours
    assert palette.norm(dim=1).min() < 0.3 and (palette.max(1).values > 0.8).sum() >= 2
    with pytest.raises(ValueError, match="--palette-images"):
        train_vae(tiny(tmp_path / "bad", colour_codes=4, palette_images=0))


def test_checkpoint_round_trip_and_atomic_write(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    gen = torch.Generator().manual_seed(5)
    path = save_checkpoint(tmp_path / "c.safetensors", modules={"model": model}, optimizer=opt, step=7,
                           meta={"note": "x"}, generators={"g": gen})
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temp file left behind
    expected = torch.rand(3, generator=gen)
    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(model2.parameters())
    gen2 = torch.Generator()
    info = load_checkpoint(path, modules={"model": model2}, optimizer=opt2, generators={"g": gen2})
    assert info["step"] == 7 and info["meta"] == {"note": "x"}
    assert torch.equal(model.weight, model2.weight)
    assert torch.equal(torch.rand(3, generator=gen2), expected)
    s1, s2 = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert all(torch.equal(torch.as_tensor(s1[k]), torch.as_tensor(s2[k])) for k in s1)


def test_a_batch_larger_than_the_data_leaves_an_earlier_run_alone(tmp_path):
    # batches() raised at the first batch, after TrainingRun had set OUT up as a fresh run.
    earlier = earlier_run(tmp_path / "run")
    with pytest.raises(ValueError, match="batch size 4 is larger than the 3 items"):
        train_vae(tiny(tmp_path / "run", data=str(three_pairs(tmp_path / "three", 32))))
    assert run_files(tmp_path / "run") == earlier


def test_checkpoint_refuses_foreign_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a dalle_fast"):
        read_checkpoint(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "missing.safetensors")


def test_each_rank_restores_its_own_rng_states(tmp_path):
    model = torch.nn.Linear(2, 2)
    states = []
    for rank in range(2):  # what two processes' rng_tensors would hold
        torch.manual_seed(10 + rank)
        states.append(rng_tensors({f"noise{rank}": torch.Generator().manual_seed(20 + rank)}))
    save_checkpoint(tmp_path / "c.safetensors", modules={"model": model}, rank_rng=states)
    for rank in range(2):
        gen = torch.Generator().manual_seed(0)
        load_checkpoint(tmp_path / "c.safetensors", modules={"model": model}, generators={f"noise{rank}": gen},
                        rank=rank)
        assert torch.equal(torch.get_rng_state(), states[rank]["rng.cpu"])
        assert torch.equal(gen.get_state(), states[rank][f"rng.gen.noise{rank}"])
    with pytest.warns(UserWarning, match="no RNG state of rank 2"):
        load_checkpoint(tmp_path / "c.safetensors", modules={"model": model}, rank=2)


def test_sampler_splits_ranks_and_resumes_mid_epoch():
    full = [list(ResumableSampler(10, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert sorted(full[0] + full[1]) == list(range(10))
    s = ResumableSampler(10, seed=1, rank=0, world_size=2)
    s.set_position(0, 2)
    assert list(s) == full[0][2:]
    s.set_position(1, 0)
    assert list(s) != full[0]  # a new epoch, a new order


@pytest.mark.parametrize("signum, said, code", [(signal.SIGTERM, "SIGTERM at step", 143),
                                               (signal.SIGINT, "Ctrl-C at step", 130)])
def test_a_signal_stops_at_a_step_boundary_and_resumes_exactly(tmp_path, signum, said, code):
    steps = 60
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))  # both runs: same threads, same sums
    cmd = [sys.executable, "-m", "dalle_fast.cli", "train-vae", "--data", "shapes", "--preset", "tiny", "--steps",
           str(steps), "--batch-size", "4", "--log-every", "1", "--sample-every", "1000", "--save-every", "100",
           "--seed", "3", "--device", "cpu"]
    subprocess.run([*cmd, "--out", str(tmp_path / "straight")], env=env, check=True, capture_output=True)
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "split")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "split" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.02)
    proc.send_signal(signum)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == code, output  # saved, but not finished: a scheduler requeues it
    assert said in output
    stopped = read_metrics(metrics)[-1]["step"]
    assert 2 <= stopped < steps, "the run ended before the signal: make it longer"
    assert read_checkpoint(tmp_path / "split" / "checkpoint.safetensors")[1]["step"] == stopped
    subprocess.run([*cmd, "--out", str(tmp_path / "split"), "--resume"], env=env, check=True, capture_output=True)
    assert_same_run(tmp_path / "straight", tmp_path / "split", ("loss", "nll", "psnr", "perplexity"), steps=steps)


class _InterruptedWorker(torch.utils.data.Dataset):
    """Each item read sends Ctrl-C's SIGINT to the process reading it (a DataLoader worker)."""

    def __len__(self):
        return 2

    def __getitem__(self, index):
        os.kill(os.getpid(), signal.SIGINT)
        return torch.tensor(index)


def test_a_dataloader_worker_leaves_ctrl_c_to_the_process_that_runs_the_training(tmp_path, capfd):
    # Ctrl-C reaches every process of the terminal's group; forked workers inherit the handler.
    from dalle_fast.train.loop import stopped_by_signal

    model = torch.nn.Linear(3, 2)
    run = TrainingRun(tmp_path, DistInfo(), modules={"model": model}, optimizer=torch.optim.SGD(model.parameters()),
                      generators={}, meta={}, record={}, resume=False, steps=10, run_steps=0, desc="test")
    with run.guard():
        loader = torch.utils.data.DataLoader(_InterruptedWorker(), batch_size=1, num_workers=1,
                                             multiprocessing_context="fork")
        assert [int(b) for b in loader] == [0, 1]  # the worker went on reading
        assert signal.getsignal(signal.SIGINT) == run._stop
    assert "Ctrl-C" not in capfd.readouterr().out
    assert run.running and stopped_by_signal() is None


def test_a_diverged_run_never_overwrites_the_last_good_checkpoint(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run = TrainingRun(tmp_path, DistInfo(), modules={"model": model}, optimizer=optimizer, generators={},
                      meta={}, record={}, resume=False, steps=10, run_steps=0, desc="test")
    with run.guard():
        run.update(model(torch.ones(1, 3)).sum(), 0.1, model, None, 0.0)
        run.save()
        good = read_checkpoint(run.ckpt)
        run.update(model(torch.ones(1, 3)).sum() * float("nan"), 0.1, model, None, 0.0)
        with pytest.raises(FloatingPointError, match="keeps the last good state"):
            run.log({"loss": float("nan")}, log=True)
        with pytest.raises(FloatingPointError, match="non-finite weights in model at step 2"):
            run.save()
    after = read_checkpoint(run.ckpt)
    assert after[1]["step"] == good[1]["step"] == 1
    assert all(torch.equal(after[0][name], good[0][name]) for name in good[0])


def test_a_diverged_run_names_its_last_checkpoint_only_if_it_wrote_one(tmp_path):
    def run_in(folder, resume):
        model = torch.nn.Linear(3, 2)
        return TrainingRun(folder, DistInfo(), modules={"model": model}, optimizer=torch.optim.SGD(model.parameters()),
                           generators={}, meta={}, record={}, resume=resume, steps=10, run_steps=0, desc="test")

    old = run_in(tmp_path, resume=False)
    old.step = 5
    old.save()  # an earlier run's checkpoint in the folder: not this fresh run's last good state
    run = run_in(tmp_path, resume=False)
    with pytest.raises(FloatingPointError, match="this run wrote no checkpoint yet"):
        run.log({"loss": float("nan")}, log=True)
    run.step = 2
    run.save()
    with pytest.raises(FloatingPointError, match="keeps the last good state, step 2"):
        run.log({"loss": float("inf")}, log=True)
    resumed = run_in(tmp_path, resume=True)
    resumed.step = 3
    with pytest.raises(FloatingPointError, match="keeps the last good state, step 2"):
        resumed.log({"loss": float("nan")}, log=True)


def test_the_cli_reports_a_diverged_run_in_one_line(tmp_path, capsys):
    from dalle_fast.cli import main

    # Adam moves every weight by about lr per step: at 1e30 the second step's activations overflow.
    args = ["train-vae", "--data", "shapes", "--preset", "tiny", "--steps", "6", "--batch-size", "4",
            "--log-every", "1", "--sample-every", "100", "--seed", "3", "--device", "cpu", "--lr", "1e30",
            "--lr-end", "1e30", "--grad-clip", "0"]
    for save_every, said in (("100", "this run wrote no checkpoint yet"), ("1", "keeps the last good state, step")):
        capsys.readouterr()
        assert main([*args, "--save-every", save_every, "--out", str(tmp_path / save_every)]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.replace("\r", "\n").splitlines() if "error" in line]
        assert len(errors) == 1 and errors[0].startswith("dalle-fast train-vae: error: training diverged"), err
        assert said in errors[0] and "Traceback" not in err


def test_torchrun_two_processes_gloo_resume_exactly(tmp_path):
    """Two processes, each with its own noise generator and RNG: a run stopped after 2 steps and
    resumed matches an uninterrupted one (every rank's RNG states are in the checkpoint)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dalle_fast.cli", "train-vae", "--data", "shapes", "--preset", "tiny", "--steps", "4",
           "--batch-size", "2", "--log-every", "1", "--sample-every", "1000", "--seed", "3", "--device", "cpu"]
    for out, extra in (("straight", []), ("split", ["--run-steps", "2"]), ("split", ["--resume"])):
        result = subprocess.run([*cmd, "--out", str(tmp_path / out), *extra], capture_output=True, text=True,
                                timeout=600, env=env, cwd=REPO)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [p.name for p in (tmp_path / "split").glob("*.safetensors")] == ["checkpoint.safetensors"]
    tensors, _ = read_checkpoint(tmp_path / "split" / "checkpoint.safetensors")
    assert "rng.gen.noise0" in tensors and "rng.rank1.gen.noise1" in tensors and "rng.rank1.cpu" in tensors
    assert_same_run(tmp_path / "straight", tmp_path / "split", ("loss", "nll", "psnr", "perplexity"), steps=4)


def test_ema_warms_up_then_decays_slowly():
    from torch.optim.swa_utils import AveragedModel

    from dalle_fast.train.loop import ema_with_warmup

    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = AveragedModel(model, multi_avg_fn=ema_with_warmup(0.999))
    ema.update_parameters(model)  # first update copies
    for n in range(1, 2000):
        model.weight.data.fill_(1.0)
        ema.update_parameters(model)
        if n == 1:  # decay (1 + 1) / (10 + 1): the average moves most of the way at once
            assert ema.module.weight.item() == pytest.approx(1 - 2 / 11, rel=1e-6)
    assert ema.module.weight.item() > 0.99


def test_a_generator_saved_on_another_kind_of_device_keeps_its_seed_with_a_warning(tmp_path):
    model = torch.nn.Linear(2, 2)
    cuda_like = rng_tensors()
    cuda_like["rng.gen.noise0"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state: seed and offset
    save_checkpoint(tmp_path / "c.safetensors", modules={"model": model}, rank_rng=[cuda_like])
    gen = torch.Generator().manual_seed(4)
    expected = torch.Generator().manual_seed(4).get_state()
    with pytest.warns(UserWarning, match="generator 'noise0' was saved on another kind of device"):
        load_checkpoint(tmp_path / "c.safetensors", modules={"model": model}, generators={"noise0": gen})
    assert torch.equal(gen.get_state(), expected)


def test_a_fresh_run_sets_an_earlier_runs_checkpoint_aside_and_cleans_up_a_killed_save(tmp_path, capsys):
    train_vae(tiny(tmp_path, steps=2))
    earlier = (tmp_path / "checkpoint.safetensors").read_bytes()
    stale = tmp_path / ".checkpoint.safetensors.abc123.tmp.safetensors"  # a save killed mid-write
    stale.write_bytes(earlier[:100])
    model = torch.nn.Linear(2, 2)
    make = lambda resume: TrainingRun(tmp_path, DistInfo(), modules={"model": model},
                                      optimizer=torch.optim.AdamW(model.parameters()), generators={}, meta={},
                                      record={}, resume=resume, steps=3, run_steps=0, desc="test")
    records = {name: (tmp_path / name).read_bytes() for name in ("metrics.jsonl", "config.json")}
    make(resume=False)  # a fresh run (no --resume) in the folder, killed before its first save
    assert not (tmp_path / "checkpoint.safetensors").exists() and not stale.exists()
    assert (tmp_path / "checkpoint.previous.safetensors").read_bytes() == earlier
    # its record goes with it: metrics.jsonl had been deleted and config.json overwritten
    assert (tmp_path / "metrics.previous.jsonl").read_bytes() == records["metrics.jsonl"]
    assert (tmp_path / "config.previous.json").read_bytes() == records["config.json"]
    assert "the run before is now" in capsys.readouterr().out
    assert make(resume=True).step == 0  # its --resume starts afresh: not from the earlier run's step 2


def test_a_run_refuses_a_folder_that_holds_another_kind_of_run(tmp_path):
    # `train-reranker --out runs/dvae` had set the dVAE aside as its checkpoint.previous (and lost
    # it to the next such typo)
    train_vae(tiny(tmp_path, steps=2))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    model = torch.nn.Linear(2, 2)
    for resume in (False, True):
        with pytest.raises(ValueError, match="holds a dvae run's checkpoint: a reranker run cannot"):
            TrainingRun(tmp_path, DistInfo(), modules={"model": model}, optimizer=torch.optim.AdamW(model.parameters()),
                        generators={}, meta={"kind": "reranker"}, record={}, resume=resume, steps=3, run_steps=0,
                        desc="test")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_the_metrics_are_on_disk_before_the_checkpoint_that_follows_them(tmp_path, monkeypatch):
    # metrics.jsonl was appended without an fsync and the checkpoint fsynced: after a power cut the
    # checkpoint at step S could outlive the metrics lines up to S, which a resume never writes again
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    train_vae(tiny(tmp_path, steps=2, save_every=1))
    saves = [i for i, path in enumerate(synced) if ".checkpoint.safetensors." in path]
    assert len(saves) == 2
    for save in saves:
        assert synced[save - 1] == str(tmp_path / "metrics.jsonl")


def test_a_fresh_run_sets_a_damaged_checkpoint_aside(tmp_path):
    # the kind check read it first, so a damaged file (an interrupted copy) refused the fresh run
    (tmp_path / "checkpoint.safetensors").write_bytes(b"half a copy")
    model = torch.nn.Linear(2, 2)
    make = lambda resume: TrainingRun(tmp_path, DistInfo(), modules={"model": model},
                                      optimizer=torch.optim.AdamW(model.parameters()), generators={},
                                      meta={"kind": "dvae"}, record={}, resume=resume, steps=3, run_steps=0,
                                      desc="test")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        make(resume=True)  # a resume cannot go on from it
    with pytest.warns(UserWarning, match="cannot be read .* sets it aside unchecked"):
        make(resume=False)
    assert (tmp_path / "checkpoint.previous.safetensors").read_bytes() == b"half a copy"


def test_every_rank_reads_the_earlier_checkpoint_before_the_main_one_sets_it_aside(tmp_path):
    # rank 1 checked the checkpoint's kind while rank 0 moved it: "no checkpoint at ...", and rank 0
    # then waited at the barrier for a rank that had died
    out = tmp_path / "run"
    model = torch.nn.Linear(2, 2)
    save_checkpoint(out / "checkpoint.safetensors", modules={"model": model}, meta={"kind": "prior"})
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "train" / "fresh_run_worker.py"), str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "rank 0: started" in result.stdout and "rank 1: started" in result.stdout
    assert (out / "checkpoint.previous.safetensors").is_file()


@pytest.mark.parametrize("options, message", [(dict(out=""), "--out must name a folder"),
                                              (dict(out="  "), "--out must name a folder"),
                                              (dict(seed=-1), r"--seed must be in \[0, 2\*\*32\)"),
                                              (dict(seed=2**64), r"--seed must be in")])
def test_an_empty_out_or_a_seed_out_of_range_is_refused(tmp_path, monkeypatch, options, message):
    # an empty --out (an unset $OUT) trained in the current folder, deleting a metrics.jsonl there
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("precious")
    with pytest.raises(ValueError, match=message):
        train_vae(dataclasses.replace(tiny(tmp_path / "run"), **options))
    assert (tmp_path / "metrics.jsonl").read_text() == "precious"


def test_resume_refuses_a_checkpoint_trained_on_other_inputs_and_time_goes_on(tmp_path):
    model = torch.nn.Linear(2, 2)
    make = lambda inputs, resume: TrainingRun(tmp_path, DistInfo(), modules={"model": model},
                                              optimizer=torch.optim.AdamW(model.parameters()), generators={},
                                              meta={"inputs": inputs}, record={}, resume=resume, steps=3,
                                              run_steps=0, desc="test")
    run = make({"dVAE": "aaa", "tokenizer": "t1"}, resume=False)
    run.progress.t0 -= 100.0  # 100 s of training
    run.save()
    with pytest.raises(ValueError, match="trained with another dVAE and another tokenizer than this run's"):
        make({"dVAE": "bbb", "tokenizer": "t2"}, resume=True)
    with pytest.raises(ValueError, match="another tokenizer than"):
        make({"dVAE": "aaa", "tokenizer": "t2"}, resume=True)
    resumed = make({"dVAE": "aaa", "tokenizer": "t1", "new": 1}, resume=True)  # a key the checkpoint lacks passes
    assert resumed.progress.elapsed() >= 100.0  # metrics.jsonl's time_s goes on from the checkpoint's
    assert make({"dVAE": None, "tokenizer": "t1"}, resume=True).step == 0  # unknown (an old cache): not checked


def _worker_pid(marker: str, rank: int, deadline: float) -> int:
    """The pid of torchrun's worker `rank` among the processes whose environment holds `marker`."""
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                env = (proc / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if marker.encode() in env and f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
                return int(proc.name)
        time.sleep(0.05)
    raise TimeoutError(f"no worker of rank {rank}")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker through /proc")
def test_torchrun_a_signal_to_one_process_stops_every_process_after_the_same_step(tmp_path):
    """Preemption on one node of several: only rank 1 gets SIGTERM. Every process stops after the
    same step, the checkpoint is written, and every process exits 143 (before, rank 1 left for the
    final save while rank 0 waited in the next step's all-reduce: both hung, nothing saved)."""
    marker = f"DALLE_FAST_TEST_RUN={tmp_path}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), DALLE_FAST_TEST_RUN=str(tmp_path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dalle_fast.cli", "train-vae", "--data", "shapes", "--preset", "tiny", "--steps", "400",
           "--batch-size", "2", "--log-every", "1", "--sample-every", "1000", "--seed", "3", "--device", "cpu",
           "--out", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            start_new_session=True)  # its own process group: a failure kills the workers too
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.05)
        os.kill(_worker_pid(marker, 1, deadline), signal.SIGTERM)
        output = proc.communicate(timeout=240)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "another process got SIGTERM at step" in output, output[-3000:]
    assert proc.returncode != 0  # torchrun reports the workers' 143 as a failure: a scheduler requeues the job
    # the final save is collective (every process passes its barrier); torchrun reports the first process
    # to exit (143) and may stop the other with a SIGTERM of its own before that one prints its line
    assert output.count("checkpoint: ") >= 1, output[-3000:]
    assert re.search(r"rank      : \d \(local_rank: \d\)\n  exitcode  : 143", output), output[-3000:]
    stopped = read_metrics(metrics)[-1]["step"]
    assert 2 <= stopped < 400
    assert read_checkpoint(tmp_path / "run" / "checkpoint.safetensors")[1]["step"] == stopped


def test_crop_trains_on_the_papers_random_crops_of_a_folder(tmp_path, monkeypatch):
    from PIL import Image

    import dalle_fast.train.vae as vae
    from dalle_fast.cli import build_parser
    from dalle_fast.data import RandomResizedCrop

    folder = tmp_path / "pairs"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (48, 40), (60 * i, 10, 200)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a picture")
    made = []
    make = vae.make_dataset
    monkeypatch.setattr(vae, "make_dataset", lambda *a, **k: made.append(make(*a, **k)) or made[-1])
    assert build_parser().parse_args(["train-vae", "--crop"]).crop is True
    for crop in (False, True):
        train_vae(tiny(tmp_path / str(crop), data=str(folder), steps=1, crop=crop))
    assert made[0].crop is None and made[1].crop == RandomResizedCrop.paper()


def test_the_logged_perplexity_pools_every_processs_codes(monkeypatch):
    """Four processes' codes, uniform over 512: the mean of their perplexities is biased low by each
    one's few tokens (and by more, the more processes); the perplexity of their pooled counts is not."""
    import dalle_fast.train.vae as vae
    from dalle_fast.dvae import codebook_perplexity

    g = torch.Generator().manual_seed(0)
    ranks = [torch.randint(0, 512, (2, 16, 16), generator=g) for _ in range(4)]
    mine = ranks[0]
    # mean_over_ranks as four processes would compute it, this one holding ranks[0]
    monkeypatch.setattr(vae.distributed, "mean_over_ranks",
                        lambda value: torch.stack([vae.code_counts(t, 512) for t in ranks]).mean(0)
                        if value.shape == (512,) else value)
    pooled = vae.pooled_perplexity(mine, 512)
    assert pooled == pytest.approx(codebook_perplexity(torch.cat(ranks), 512).item(), rel=1e-6)
    assert pooled > 1.1 * sum(codebook_perplexity(t, 512).item() for t in ranks) / 4
