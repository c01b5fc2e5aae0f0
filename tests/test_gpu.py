"""GPU subset: skipped on CPU-only machines (conftest marks them), run where CUDA is present."""

import json

import pytest

from launch import TINY_MODEL, data_args, read_metrics, torchrun

pytestmark = [pytest.mark.gpu, pytest.mark.multiprocess]


def _gpu_args():
    args = [a for a in TINY_MODEL]
    args[args.index("--device") + 1] = "cuda"
    return args


def test_bf16_training_on_one_gpu(tmp_path, books_data):
    """CUDA + NCCL, Transformer Engine's layer spec when importable, flex attention, bf16: the loss
    goes down."""
    metrics = str(tmp_path / "m.jsonl")
    proc = torchrun(1, [*_gpu_args(), *data_args(*books_data, cache=str(tmp_path / "c")),
                        "--bf16", "--train-iters", "10", "--lr", "3e-3", "--metrics-jsonl", metrics,
                        "--seq-length", "128"])
    assert "on cuda/nccl" in proc.stdout
    assert "attention: flex" in proc.stdout  # the GPU default, on a length that fits its tiles
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


def test_flex_forward_and_backward_equal_blockwise_on_cuda():
    """fp32 on the GPU, documents + branches + GQA, CP=2 emulated: flex's compiled kernels (forward
    and backward) against the blockwise backend."""
    import math

    import torch

    from megatron_ext.parallel.cp_layout import cp_gathered_indices, cp_token_indices
    from megatron_ext.model.cp_attention import context_parallel_attention
    from megatron_ext.model.flex_attention import flex_context_parallel_attention

    seq, heads, groups, dim, cp = 1024, 8, 2, 64, 2
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(seq, 2, n, dim, device="cuda", generator=g) for n in (heads, groups, groups))
    docs = torch.tensor([[0] * 300 + [1] * 724, [0] * 1024], device="cuda")
    branches = torch.tensor([[0] * 200 + [1] * 100 + [0] * 400 + [1] * 200 + [2] * 124,
                             [0] * 512 + [1] * 256 + [2] * 256], device="cuda")
    gathered = cp_gathered_indices(seq, cp).cuda()
    grad_out = torch.randn(seq // cp, 2, heads * dim, device="cuda", generator=g)
    for rank in range(cp):
        local = cp_token_indices(seq, cp, rank).cuda()
        results = []
        for fn in (flex_context_parallel_attention, context_parallel_attention):
            inputs = [q[local].clone().requires_grad_(), k[gathered].clone().requires_grad_(),
                      v[gathered].clone().requires_grad_()]
            out = fn(*inputs, seq_len=seq, cp_size=cp, cp_rank=rank,
                     softmax_scale=1 / math.sqrt(dim), query_document_ids=docs[:, local],
                     key_document_ids=docs[:, gathered], query_branch_ids=branches[:, local],
                     key_branch_ids=branches[:, gathered])
            out.backward(grad_out)
            results.append([out.detach()] + [t.grad for t in inputs])
        for flex, blockwise in zip(*results):
            torch.testing.assert_close(flex, blockwise, rtol=2e-4, atol=2e-4)


def test_flex_training_loss_equals_blockwise_and_the_log_names_it(tmp_path, books_data):
    """CP=1, fp32, the same initial checkpoint: the first losses with flex and with blockwise on
    CUDA agree, and the start-up line and the metrics JSONL name flex as what ran."""
    data = data_args(*books_data, cache=str(tmp_path / "c"))
    init = str(tmp_path / "init")
    torchrun(1, [*TINY_MODEL, *data, "--train-iters", "0", "--lr-warmup-iters", "0", "--save", init])
    losses = {}
    for backend in ("flex", "blockwise"):
        metrics = str(tmp_path / f"{backend}.jsonl")
        proc = torchrun(1, [*_gpu_args(), *data, "--train-iters", "3", "--lr-warmup-iters", "0",
                            "--transformer-impl", "local", "--seq-length", "128",
                            "--attention-backend", backend, "--load", init, "--finetune",
                            "--metrics-jsonl", metrics])
        assert f"attention: {backend}" in proc.stdout and "on cuda/nccl" in proc.stdout
        with open(metrics) as f:
            run_record = json.loads(f.readline())
        assert run_record["kind"] == "run" and run_record["device"] == "cuda"
        assert set(run_record["attention_per_layer"]) == {backend}
        losses[backend] = [r["loss"] for r in read_metrics(metrics)]
    for flex, blockwise in zip(losses["flex"], losses["blockwise"]):
        assert abs(flex - blockwise) / blockwise <= 1e-4, losses
