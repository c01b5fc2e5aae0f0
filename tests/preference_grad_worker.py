"""One global batch through the training schedule in both preference layouts; compares gradients.

    torchrun --nproc-per-node N tests/preference_grad_worker.py TRAINING FLAGS... OUTPUT.json

Builds the run exactly as ``megatron_ext.train`` does (flags, model, optimizer, datasets), then runs
the forward/backward schedule on the first global batch with ``separate`` and again with
``shared-prefix`` packing, and writes, from rank 0, both reported losses and the largest relative
difference of any parameter's gradient (after Megatron's gradient finalisation).
"""

import dataclasses
import json
import sys

from launch import training_setup
from megatron_ext import parallel, train
from megatron_ext.data.gpt_data import MicroBatchIterator


def gradients(s, layout: str):
    s.train_data.config = dataclasses.replace(s.train_data.config, layout=layout)
    for chunk in s.model:
        chunk.zero_grad_buffer()
    report = train.run_schedule(s, MicroBatchIterator(s.train_data, s.layout, 0), forward_only=False)
    grads = {name: param.main_grad.detach().clone().double()
             for name, param in s.model[0].named_parameters()}
    return report, grads


def main() -> None:
    *flags, output = sys.argv[1:]
    with training_setup(flags) as s:
        separate, grads_separate = gradients(s, "separate")
        shared, grads_shared = gradients(s, "shared-prefix")
        worst, worst_name = 0.0, None
        for name, g in grads_separate.items():
            diff = ((grads_shared[name] - g).norm() / g.norm().clamp(min=1e-30)).item()
            if diff > worst:
                worst, worst_name = diff, name
        nonzero = sum(int(g.abs().sum() > 0) for g in grads_separate.values())
        if parallel.is_rank0():
            with open(output, "w") as f:
                json.dump({"separate": separate, "shared-prefix": shared,
                           "max_rel_grad_diff": worst, "worst_param": worst_name,
                           "params": len(grads_separate), "params_with_grad": nonzero}, f)


if __name__ == "__main__":
    main()
