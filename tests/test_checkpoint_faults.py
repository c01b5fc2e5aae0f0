"""A save killed at any point leaves the previous checkpoint, and --load resumes from it exactly;
a damaged checkpoint stops the run before any training, naming the file."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from launch import REPO_ROOT, TINY_MODEL, data_args, read_metrics, run

pytestmark = pytest.mark.multiprocess

TRAIN = ["--train-iters", "4", "--save-interval", "2"]
TRACKER = "latest_checkpointed_iteration.txt"


def _train(args, check=True):
    """One process, no torchrun."""
    return run([sys.executable, "-m", "megatron_ext.train", *args], check=check)


def _killed_run(args, point: str, iteration: int) -> subprocess.CompletedProcess:
    """The worker dies by SIGKILL at ``point``; the helpers its saves started (multiprocessing
    writers) are orphaned with the pipe still open, so its whole session is killed after it."""
    cmd = [sys.executable, f"{REPO_ROOT}/tests/ckpt_kill_worker.py", point, str(iteration), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT}
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            returncode = proc.wait(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        out.seek(0)
        return subprocess.CompletedProcess(cmd, returncode, out.read(), "")


@pytest.fixture(scope="module")
def setting(tmp_path_factory, books_data):
    root = tmp_path_factory.mktemp("faults")
    return root, [*TINY_MODEL, *data_args(*books_data, cache=str(root / "index-cache")), *TRAIN]


@pytest.fixture(scope="module")
def uninterrupted(setting):
    root, common = setting
    _train([*common, "--save", str(root / "whole"), "--metrics-jsonl", str(root / "whole.jsonl"),
            "--keep-last-n-checkpoints", "1"])
    return {r["iteration"]: r for r in read_metrics(str(root / "whole.jsonl"))}


@pytest.mark.parametrize("point, mode", [("staged", "sync"), ("shards", "sync"), ("rename", "sync"),
                                         ("tracker", "sync"), ("shards", "async"),
                                         ("tracker", "async")])
def test_kill_inside_a_save_resumes_from_the_last_complete_checkpoint(setting, uninterrupted,
                                                                       point, mode):
    root, common = setting
    ckpt = root / f"killed-{point}-{mode}"
    save_flags = ["--async-save"] if mode == "async" else []
    proc = _killed_run([*common, "--save", str(ckpt), *save_flags], point, 4)
    assert proc.returncode == -9 and f"KILLED AT {point}" in proc.stdout, proc.stdout[-3000:]
    assert (ckpt / TRACKER).read_text() == "2"

    metrics = root / f"resumed-{point}-{mode}.jsonl"
    _train([*common, "--save", str(ckpt), "--load", str(ckpt), "--metrics-jsonl", str(metrics),
            *save_flags])
    resumed = read_metrics(str(metrics))
    assert [r["iteration"] for r in resumed] == [3, 4]
    for r in resumed:  # bitwise: the same data position, optimizer, schedule and RNG
        for key in ("loss", "lr", "grad_norm"):
            assert r[key] == uninterrupted[r["iteration"]][key], (key, r)
    assert (ckpt / TRACKER).read_text() == "4"
    assert sorted(os.listdir(ckpt)) == ["iter_0000002", "iter_0000004", TRACKER]


def _damaged(root, name, damage):
    ckpt = root / name
    shutil.rmtree(ckpt, ignore_errors=True)
    shutil.copytree(root / "whole", ckpt)
    damage(ckpt, ckpt / "iter_0000004")
    return ckpt


def _truncate(path):
    os.truncate(path, os.path.getsize(path) - 1)


@pytest.mark.parametrize("name, damage, named", [
    ("truncated-shard", lambda c, it: _truncate(it / "__0_1.distcp"), "iter_0000004/__0_1.distcp is truncated"),
    ("missing-shard", lambda c, it: os.remove(it / "__0_0.distcp"), "iter_0000004/__0_0.distcp is missing"),
    ("bad-metadata", lambda c, it: _truncate(it / ".metadata"), "iter_0000004/.metadata cannot be read"),
    ("tracker-to-nowhere", lambda c, it: (c / TRACKER).write_text("6"), "names iteration 6, but"),
    ("tracker-garbage", lambda c, it: (c / TRACKER).write_text("latest"), "holds 'latest'"),
    ("bad-model-args", lambda c, it: (it / "model_args.json").write_text('{"num_layers": 2,'), "iter_0000004/model_args.json cannot be read"),
])
def test_damaged_checkpoint_stops_before_training(setting, uninterrupted, name, damage, named):
    root, common = setting
    ckpt = _damaged(root, name, damage)
    metrics = root / f"{name}.jsonl"
    proc = _train([*common, "--load", str(ckpt), "--metrics-jsonl", str(metrics)], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "megatron_ext.train: error:" in proc.stderr and named in proc.stderr, proc.stderr
    assert not metrics.exists()  # nothing ran


def _parse(argv, capsys):
    from megatron_ext import arguments

    with pytest.raises(SystemExit) as stop:
        arguments.parse(argv, world_size=1)
    return stop.value.code, capsys.readouterr().err


def test_load_without_a_checkpoint_warns_or_stops(setting, tmp_path, capsys):
    from megatron_ext import arguments

    _, common = setting
    empty = ["--load", str(tmp_path), "--save", str(tmp_path / "out")]
    cfg = arguments.parse([*common, *empty], world_size=1)
    assert cfg.checkpoint.load == str(tmp_path)
    assert f"WARNING: could not find the metadata file {tmp_path / TRACKER}" in capsys.readouterr().err
    for flag in ("--exit-on-missing-checkpoint", "--finetune"):
        code, err = _parse([*common, *empty, flag], capsys)
        assert code == 2 and f"no {TRACKER}" in err and flag in err, err


def test_keep_last_n_checkpoints(setting, uninterrupted, tmp_path):
    from megatron_ext.checkpoints import checkpointing

    root, _ = setting
    # The uninterrupted run saved iterations 2 and 4 with --keep-last-n-checkpoints 1.
    assert sorted(os.listdir(root / "whole")) == ["iter_0000004", TRACKER]
    # Never the directory the tracker names, even when it is not among the newest.
    for i in (1, 2, 3, 5, 6):
        (tmp_path / f"iter_{i:07d}").mkdir()
    (tmp_path / "iter_0000003" / "x").write_text("x")
    (tmp_path / TRACKER).write_text("2")
    removed = checkpointing.remove_old_checkpoints(str(tmp_path), 2)
    assert removed == ["iter_0000001", "iter_0000003"]
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", "iter_0000005", "iter_0000006", TRACKER]


@pytest.mark.parametrize("extra, expected", [
    (["--keep-last-n-checkpoints", "0"], "--keep-last-n-checkpoints 0: give N >= 1"),
])
def test_refused_save_flags(setting, tmp_path, capsys, extra, expected):
    _, common = setting
    code, err = _parse([*common, "--save", str(tmp_path), *extra], capsys)
    assert code == 2 and expected in err, err
    at = common.index("--save-interval")
    code, err = _parse([*common[:at], *common[at + 2:], "--async-save"], capsys)
    assert code == 2 and "--async-save needs --save DIR" in err, err


def _checkpoint_tensors(ckpt_dir, tmp_path, name):
    """Every tensor of a torch_dist checkpoint, read with torch's own converter (not ours)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"{name}.pt"
    dcp_to_torch_save(str(ckpt_dir), str(out))
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk("", torch.load(out, weights_only=False))
    return flat


def test_async_save_trains_and_saves_the_same_as_a_synchronous_save(setting, uninterrupted,
                                                                     tmp_path):
    root, common = setting
    ckpt, metrics = root / "async", root / "async.jsonl"
    proc = _train([*common, "--save", str(ckpt), "--metrics-jsonl", str(metrics), "--async-save",
                   "--keep-last-n-checkpoints", "1"])
    log = proc.stdout + proc.stderr
    # The asynchronous path ran: scheduled first, published later by the finalize step.
    assert "scheduled asynchronous checkpoint at iteration 2" in log, log[-3000:]
    assert "saved checkpoint at iteration 4" in log and "asynchronous)" in log, log[-3000:]
    for r in read_metrics(str(metrics)):  # the forked writers do not perturb training
        for key in ("loss", "lr", "grad_norm"):
            assert r[key] == uninterrupted[r["iteration"]][key], (key, r)
    assert sorted(os.listdir(ckpt)) == ["iter_0000004", TRACKER]
    assert (ckpt / TRACKER).read_text() == "4"
    ours = _checkpoint_tensors(ckpt / "iter_0000004", tmp_path, "async")
    want = _checkpoint_tensors(root / "whole" / "iter_0000004", tmp_path, "sync")
    assert sorted(ours) == sorted(want) and any("optimizer" in k for k in want), sorted(want)[:10]
    for key, tensor in want.items():
        assert torch_equal(ours[key], tensor), key


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
