"""Worker for test_evaluate.py: the training hook on an in-memory, DDP-wrapped SmolLM2, called the
way megatron_ext.train calls it at --eval-interval. Prints one JSON line."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def main(spec: dict) -> None:
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_ext import arguments, parallel
    from megatron_ext.config import (CheckpointConfig, DataConfig, DistributedConfig,
                                     LoggingConfig, ObjectiveConfig, RunConfig, TrainingConfig)
    from megatron_ext.evaluate import training_hook
    from megatron_ext.evaluate.model_runner import load_model
    from megatron_ext.metrics import MetricsWriter

    parser = arguments.build_parser(providers=[training_hook.PROVIDER])
    model_spec = spec["model"]
    args = parser.parse_args([
        *model_spec["flags"], "--load", model_spec["mg"], "--device", "cpu", "--seq-length", "1024",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", model_spec["hf"],
        "--eval-interval", "7", "--eval-tasks", "ppl-by-position,passkey", "--eval-lengths", "1K",
        "--eval-depths", "0.5", "--eval-num-samples", "1", "--eval-tasks-data", spec["data"]])
    model_config, layout = arguments.model_and_layout(args, world_size=1)
    parallel.initialize(1, 1, 1, device="cpu")
    try:
        tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
        model_config, module = load_model(args.load, model_config, layout, torch.device("cpu"),
                                          on_cpu=True)
        # The run config training would hold for these flags (no training data needed here).
        cfg = RunConfig(
            model=model_config, layout=layout, distributed=DistributedConfig("cpu"),
            data=DataConfig((), ([], None), args.tokenizer_type, args.tokenizer_model),
            training=TrainingConfig(1, 1, 1, 7, 7, eval_interval=7, eval_iters=1,
                                    seed=args.seed),
            checkpoint=CheckpointConfig(load=args.load), logging=LoggingConfig(),
            objective=ObjectiveConfig("pretrain"),
            extras={"eval_tasks": training_hook.PROVIDER.section(args)})
        model = [DistributedDataParallel(config=module.config,
                                         ddp_config=DistributedDataParallelConfig(), module=module)]
        model[0].train()
        writer = MetricsWriter(True, spec["metrics"], spec["tensorboard"])
        metrics = training_hook.run_during_training(model, cfg, 7, writer)
        writer.close()
        print(json.dumps({"metrics": metrics, "training_mode_after": module.training}), flush=True)
    finally:
        parallel.destroy()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
