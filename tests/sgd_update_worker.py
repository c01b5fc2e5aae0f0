"""One training iteration with the flags given; writes what it changed and a forward-only check.

    torchrun --nproc-per-node 1 tests/sgd_update_worker.py TRAINING FLAGS... OUTPUT.json

Builds the run as ``megatron_ext.train`` does, keeps every parameter before the step, runs one
``train.train_step`` and writes, per parameter, the largest |delta + lr x grad| next to the largest
|lr x grad|. Independently of the backward pass, it also measures the loss of the same first batch
at theta0 +- eps x delta with forward passes only: a central difference of the directional
derivative along delta, which for a plain gradient step is -|delta|^2 / lr.
"""

import json
import sys

import torch

from launch import training_setup
from megatron_ext import parallel, train
from megatron_ext.data.gpt_data import MicroBatchIterator


def batch_loss(s) -> float:
    data = MicroBatchIterator(s.train_data, s.layout, start_iteration=0)
    with torch.no_grad():
        return train.run_schedule(s, data, forward_only=True)[s.objective.loss_key]


def main() -> None:
    *flags, output = sys.argv[1:]
    with training_setup(flags) as s:
        params = dict(s.model[0].named_parameters())
        before = {name: p.detach().clone().double() for name, p in params.items()}
        lr = s.optimizer.param_groups[0]["lr"]
        report = train.train_step(s, MicroBatchIterator(s.train_data, s.layout, 0))
        worst, scale = 0.0, 0.0
        delta = {}
        for name, p in params.items():
            delta[name] = p.detach().double() - before[name]
            step = lr * p.main_grad.detach().double()
            worst = max(worst, (delta[name] + step).abs().max().item())
            scale = max(scale, step.abs().max().item())
        sq_norm = sum((d * d).sum().item() for d in delta.values())
        eps = 1e-2  # of the step: small against the loss's curvature, large against fp32 noise
        losses = {}
        for sign in (1, -1):
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_((before[name] + sign * eps * delta[name]).to(p.dtype))
            losses[sign] = batch_loss(s)
        directional = (losses[1] - losses[-1]) / (2 * eps)
        if parallel.is_rank0():
            with open(output, "w") as f:
                json.dump({"lr": lr, "loss": report[s.objective.loss_key],
                           "grad_norm": report["grad_norm"], "max_abs_diff": worst,
                           "max_abs_step": scale, "params": len(params),
                           "directional_derivative": directional,
                           "expected_directional_derivative": -sq_norm / lr}, f)


if __name__ == "__main__":
    main()
