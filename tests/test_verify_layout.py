"""tools/verify_layout.py: PASS for an equivalent layout, FAIL when the runs really differ, and
clear errors for bad flags."""

import json
import sys

import pytest

from launch import TINY_MODEL, data_args, run

pytestmark = pytest.mark.multiprocess

# lr > 0 from iteration 1, so iterations 2 and 3 compare trained weights.
NO_WARMUP = ["--lr-warmup-iters", "0"]


def verify(tmp_path, books_data, *args):
    flags = [*TINY_MODEL, *NO_WARMUP, *data_args(*books_data, cache=str(tmp_path / "cache"))]
    proc = run([sys.executable, "tools/verify_layout.py", *args, "--work-dir", tmp_path / "work",
                *flags], check=False)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return proc, summary


def test_context_parallel_passes(tmp_path, books_data):
    proc, summary = verify(tmp_path, books_data, "--layout-a", "tp=1", "--layout-b", "cp=2",
                           "--iterations", "3")
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary["passed"] and summary["layout_b"] == "tp=1,pp=1,cp=2,dp=1"
    assert [r["iteration"] for r in summary["iterations"]] == [1, 2, 3]
    # The runs trained: the losses move, and many parameters were compared.
    assert len({r["loss_a"] for r in summary["iterations"]}) == 3
    assert proc.stdout.count("PASS gradient ") >= 10 and "FAIL" not in proc.stdout
    assert summary["worst_param_rel_diff"] <= 1e-5


def test_layout_dependent_flags_fail(tmp_path, books_data):
    # Dropout draws its masks per rank: under CP=2 each rank masks its own chunk with the same
    # stream, so the model differs from one process's - the tool must say so.
    proc, summary = verify(tmp_path, books_data, "--layout-b", "cp=2", "--iterations", "2",
                           "--hidden-dropout", "0.1")
    print(proc.stdout)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert not summary["passed"] and summary["worst_param_rel_diff"] > 1e-3
    assert "FAIL iteration 1" in proc.stdout and "FAIL gradient " in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--layout-b", "tp=two"], "--layout-b 'tp=two'"),
    (["--layout-b", "ep=2"], "--layout-b 'ep=2'"),
    (["--layout-b", "tp=2", "--tensor-model-parallel-size", "2"],
     "--tensor-model-parallel-size is set by verify_layout"),
    (["--layout-b", "tp=2", "--iterations", "0"], "--iterations must be >= 1"),
])
def test_bad_flags_are_named(capsys, args, message):
    from megatron_ext.commands import verify_layout

    assert verify_layout.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("verify_layout.py: error:") and message in err, err


def test_failed_run_is_reported(tmp_path, capsys):
    from megatron_ext.commands import verify_layout

    # A training flag the trainer refuses: the run's own error comes back, exit status 2.
    code = verify_layout.main(["--layout-b", "tp=2", "--work-dir", str(tmp_path), *TINY_MODEL,
                               "--data-path", str(tmp_path / "missing"), "--tokenizer-type",
                               "SentencePieceTokenizer", "--tokenizer-model",
                               str(tmp_path / "missing.model")])
    err = capsys.readouterr().err
    assert code == 2 and "the run under layout tp=1,pp=1,cp=1,dp=1 failed" in err, err
