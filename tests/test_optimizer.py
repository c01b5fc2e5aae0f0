"""--optimizer sgd: with momentum, weight decay and clipping off, an update is -lr x gradient."""

import json
import sys

import pytest

from launch import REPO_ROOT, TINY_MODEL, data_args, free_port, rel_diff, run

pytestmark = pytest.mark.multiprocess


def _one_step(tmp_path, books_data, extra):
    args = list(TINY_MODEL)
    args[args.index("--lr-warmup-iters") + 1] = "0"
    args[args.index("--lr-decay-style") + 1] = "constant"
    args[args.index("--lr") + 1] = "0.5"
    out = tmp_path / "sgd.json"
    run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port",
         str(free_port()), f"{REPO_ROOT}/tests/sgd_update_worker.py", *args,
         *data_args(*books_data, cache=str(tmp_path / "c")), "--train-iters", "1",
         "--weight-decay", "0", "--clip-grad", "0", *extra, str(out)])
    return json.loads(out.read_text())


def test_sgd_update_is_minus_lr_times_gradient(tmp_path, books_data):
    result = _one_step(tmp_path, books_data, ["--optimizer", "sgd", "--sgd-momentum", "0"])
    print(result)
    assert result["lr"] == 0.5
    assert result["max_abs_step"] > 0
    # delta == -lr * grad up to the fp32 rounding of p - lr * g
    assert result["max_abs_diff"] <= 1e-6 * max(1.0, result["max_abs_step"])
    # ... and that gradient is the loss's: forward passes alone along the step agree.
    assert rel_diff(result["directional_derivative"],
                    result["expected_directional_derivative"]) <= 1e-2


def test_adam_update_is_not_a_gradient_step(tmp_path, books_data):
    """The check above can fail: Adam's first step is lr x sign-like, not lr x gradient."""
    result = _one_step(tmp_path, books_data, [])
    assert result["max_abs_diff"] > 1e-3 * result["max_abs_step"]
