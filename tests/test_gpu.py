"""GPU subset: skipped on CPU-only machines (conftest marks them), run where CUDA is present."""

import pytest

from launch import TINY_MODEL, data_args, read_metrics, torchrun

pytestmark = [pytest.mark.gpu, pytest.mark.multiprocess]


def _gpu_args():
    args = [a for a in TINY_MODEL]
    args[args.index("--device") + 1] = "cuda"
    return args


def test_bf16_training_on_one_gpu(tmp_path, books_data):
    """CUDA + NCCL, Transformer Engine's layer spec when importable, bf16: the loss goes down."""
    metrics = str(tmp_path / "m.jsonl")
    proc = torchrun(1, [*_gpu_args(), *data_args(*books_data, cache=str(tmp_path / "c")),
                        "--bf16", "--train-iters", "10", "--lr", "3e-3", "--metrics-jsonl", metrics])
    assert "on cuda/nccl" in proc.stdout
    losses = [r["loss"] for r in read_metrics(metrics)]
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.5


def test_fp32_gpu_matches_cpu_first_loss(tmp_path, books_data):
    """The same initial checkpoint gives the same first loss on GPU (fp32) and CPU."""
    data = data_args(*books_data, cache=str(tmp_path / "c"))
    init = str(tmp_path / "init")
    torchrun(1, [*TINY_MODEL, *data, "--train-iters", "0", "--lr-warmup-iters", "0", "--save", init])
    results = {}
    for name, model_args in (("cpu", TINY_MODEL), ("gpu", _gpu_args())):
        metrics = str(tmp_path / f"{name}.jsonl")
        torchrun(1, [*model_args, *data, "--train-iters", "1", "--lr-warmup-iters", "0",
                     "--transformer-impl", "local", "--load", init, "--finetune",
                     "--metrics-jsonl", metrics])
        results[name] = read_metrics(metrics)[0]["loss"]
    assert abs(results["gpu"] - results["cpu"]) / results["cpu"] <= 1e-4
