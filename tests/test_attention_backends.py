"""Choosing the attention backend: refusals before any work, the GPU config, flex in evaluation.

* Every combination a backend cannot do exactly fails while the flags are read, naming the flag.
  GPU-only decisions (TE present, CUDA) are checked by calling the planner with ``on_cpu=False``
  and Transformer Engine reported present; on this machine neither exists.
* The local spec's GPU configuration builds (it used to assert on ``persist_layer_norm``).
* ``--skip-train`` and ``python -m megatron_ext.evaluate`` give the same losses with flex (its
  compiled CPU forward) as with the blockwise backend, single process and CP=2.
* Checkpoints of the local spec load into a model whose core attention keeps ``_extra_state``.
"""

import json
import os
import subprocess
import sys

import pytest

from launch import (
    REPO_ROOT,
    TINY_MODEL,
    data_args,
    free_port,
    read_metrics_file,
    rel_diff,
    run,
    torchrun,
)
from megatron_ext import arguments
from megatron_ext.config import document_masking_source
from megatron_ext.errors import ArgumentError
from megatron_ext.model import attention_backends
from megatron_ext.model.attention_backends import plan_attention

pytest_plugins = ("evaluate_fixtures",)  # eval_jsonl


def flags(*extra, cp=1, tp=1, heads=8):
    args = arguments.build_parser().parse_args([
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", str(heads),
        "--num-query-groups", "2", "--seq-length", "4096", "--context-parallel-size", str(cp),
        "--tensor-model-parallel-size", str(tp), *extra])
    args.objective = args.objective or "pretrain"
    return args


def plan_for(args, on_cpu, training, seq_lengths=None):
    """plan_attention for these flags: the model and layout as training builds them."""
    model, layout = arguments.model_and_layout(
        args, args.tensor_model_parallel_size * args.context_parallel_size)
    masks = document_masking_source(args.objective,
                                    args.packed_documents or args.reset_attention_mask)
    return plan_attention(model, layout, on_cpu, training, seq_lengths, masks)


@pytest.fixture
def te_present(monkeypatch):
    monkeypatch.setattr(attention_backends, "te_available", lambda: True)


# ------------------------------------------------------------------------------------------------
# What auto picks, and what each backend refuses
# ------------------------------------------------------------------------------------------------

def test_auto_picks_flex_on_cuda_and_blockwise_on_cpu(te_present):
    on_gpu = plan_for(flags(), on_cpu=False, training=True)
    assert (on_gpu.backend, on_gpu.layer_spec) == ("flex", "transformer_engine")
    on_cpu = plan_for(flags(), on_cpu=True, training=True)
    assert (on_cpu.backend, on_cpu.layer_spec) == ("blockwise", "local")
    # Never TE's attention unless asked for, also with packed documents on a TE machine.
    assert plan_for(flags("--packed-documents"), on_cpu=False, training=True).backend == "flex"
    assert plan_for(flags("--attention-backend", "torch"), on_cpu=True,
                          training=True).backend == "blockwise"  # the former name


@pytest.mark.parametrize("extra, on_cpu, training, message", [
    (["--attention-backend", "flex"], True, True, "--attention-backend flex has no backward on CPU"),
    (["--attention-backend", "te"], True, False, "--attention-backend te needs the Transformer Engine"),
    (["--attention-backend", "flex", "--attention-block-size", "256"], False, True,
     "--attention-block-size sizes the blockwise"),
    (["--attention-backend", "flex", "--seq-length", "1000"], False, True,
     "multiple of its 128-token kernel tile"),
    (["--attention-dropout", "0.1"], False, True, "--attention-dropout 0.1"),
    (["--transformer-impl", "transformer_engine"], True, True, "--transformer-impl local"),
])
def test_refusals_name_the_flag(extra, on_cpu, training, message):
    with pytest.raises(ArgumentError, match=message.replace("+", r"\+")):
        plan_for(flags(*extra), on_cpu=on_cpu, training=training)


def test_flex_chunks_must_fit_the_kernel_tile_under_cp():
    plan_for(flags("--attention-backend", "flex", "--seq-length", "4096"), on_cpu=False,
                   training=True, seq_lengths=[4096])
    with pytest.raises(ArgumentError, match=r"--seq-length 2560 / \(2 x --context-parallel-size 4\) = 320"):
        plan_for(flags("--attention-backend", "flex", cp=4), on_cpu=False, training=True,
                       seq_lengths=[2560])
    # On CPU (forward only) FlexAttention takes any length.
    plan_for(flags("--attention-backend", "flex"), on_cpu=True, training=False,
                   seq_lengths=[1000])


@pytest.mark.parametrize("extra", [["--packed-documents"], ["--reset-attention-mask"],
                                   ["--objective", "sft"]])
def test_te_refuses_packed_documents_and_names_flex(te_present, extra):
    args = flags("--attention-backend", "te", *extra)
    args.packed_documents = args.packed_documents or args.reset_attention_mask
    with pytest.raises(ArgumentError, match="use --attention-backend flex"):
        plan_for(args, on_cpu=False, training=True)


def test_te_refuses_preference_data(te_present):
    args = flags("--attention-backend", "te")
    args.objective = "preference"
    with pytest.raises(ArgumentError, match="preference data.*--attention-backend flex"):
        plan_for(args, on_cpu=False, training=True)


def test_te_context_parallel_exchanges(te_present):
    te = ("--attention-backend", "te")
    assert plan_for(flags(*te, cp=2), on_cpu=False, training=True).cp_comm_type == "p2p"
    # Megatron-LM's help spelling is translated to TE's name.
    plan = plan_for(flags(*te, "--cp-comm-type", "allgather", cp=2), on_cpu=False,
                          training=True)
    assert plan.cp_comm_type == "all_gather"
    # a2a exchanges whole heads: 8 heads / TP 2 = 4 per rank, not divisible by CP 8 (by CP 2: fine).
    with pytest.raises(ArgumentError, match=r"--cp-comm-type a2a exchanges whole heads.*= 4\) must be divisible by --context-parallel-size \(8\)"):
        plan_for(flags(*te, "--cp-comm-type", "a2a", cp=8, tp=2), on_cpu=False,
                       training=True)
    plan_for(flags(*te, "--cp-comm-type", "a2a", cp=2, tp=2), on_cpu=False, training=True)
    # a2a+p2p needs Megatron's hierarchical groups, or TE gets no CP group at all.
    with pytest.raises(ArgumentError, match="needs --hierarchical-context-parallel-sizes"):
        plan_for(flags(*te, "--cp-comm-type", "a2a+p2p", cp=4), on_cpu=False, training=True)
    with pytest.raises(ArgumentError, match="product is --context-parallel-size"):
        plan_for(flags(*te, "--cp-comm-type", "a2a+p2p",
                             "--hierarchical-context-parallel-sizes", "2", "3", cp=4),
                       on_cpu=False, training=True)
    plan = plan_for(flags(*te, "--cp-comm-type", "a2a+p2p",
                                "--hierarchical-context-parallel-sizes", "2", "2", cp=4),
                          on_cpu=False, training=True)
    assert plan.hierarchical_cp_sizes == (2, 2)


def test_our_backends_refuse_te_exchanges():
    with pytest.raises(ArgumentError, match="--cp-comm-type p2p is a Transformer Engine exchange"):
        plan_for(flags("--cp-comm-type", "p2p", cp=2), on_cpu=True, training=True)
    with pytest.raises(ArgumentError, match="--hierarchical-context-parallel-sizes applies"):
        plan_for(flags("--hierarchical-context-parallel-sizes", "1", "2", cp=2),
                       on_cpu=True, training=True)
    assert plan_for(flags("--cp-comm-type", "all_gather", cp=2), on_cpu=True,
                          training=True).cp_comm_type == "all_gather"


def test_te_detection_follows_megatron_not_a_bare_import():
    """Here Megatron-Core has no TE, so TE is not available, whatever `import transformer_engine`
    would say; the planner then never builds the TE spec."""
    from megatron.core.extensions import transformer_engine as megatron_te

    assert attention_backends.te_available() is bool(megatron_te.HAVE_TE) is False
    assert plan_for(flags(), on_cpu=False, training=True).layer_spec == "local"


# ------------------------------------------------------------------------------------------------
# End to end through the training command: refused before anything is written
# ------------------------------------------------------------------------------------------------

def _train_refused(args, tmp_path, world_size=1):
    outputs = ["--save", str(tmp_path / "ckpt"), "--metrics-jsonl", str(tmp_path / "m.jsonl")]
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "WORLD_SIZE": str(world_size)}
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.train", *args, *outputs],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert not any((tmp_path / name).exists() for name in ("ckpt", "m.jsonl"))
    return proc.stderr


@pytest.mark.parametrize("extra, world_size, message", [
    (["--attention-backend", "flex"], 1, "--attention-backend flex has no backward on CPU"),
    (["--attention-backend", "te"], 1, "--attention-backend te needs the Transformer Engine"),
    (["--context-parallel-size", "2", "--cp-comm-type", "a2a"], 2,
     "--cp-comm-type a2a is a Transformer Engine exchange"),
])
def test_training_command_refuses_before_any_work(books_data, tmp_path, extra, world_size,
                                                  message):
    stderr = _train_refused([*TINY_MODEL, *data_args(*books_data, cache=str(tmp_path / "c")),
                             *extra], tmp_path, world_size)
    assert message in stderr, stderr


# ------------------------------------------------------------------------------------------------
# The local spec's GPU configuration
# ------------------------------------------------------------------------------------------------

GPU_CONFIG_BUILD = """
from megatron_ext import arguments, parallel
from megatron_ext.model import build_model, transformer_config
args = arguments.build_parser().parse_args([
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "8",
    "--num-query-groups", "2", "--seq-length", "256", "--transformer-impl", "local",
    "--ffn-hidden-size", "128"])
model_config, layout = arguments.model_and_layout(args, world_size=1)
model_config = model_config.with_vocab(256)
config = transformer_config(model_config, layout, on_cpu=False)  # what a GPU run builds
assert config.persist_layer_norm is False
parallel.initialize(device="cpu")
model = build_model(model_config, layout, config, on_cpu=True)
print(sum(p.numel() for p in model.parameters()))
parallel.destroy()
"""


def test_the_gpu_config_of_the_local_spec_builds_a_model():
    """transformer_config(on_cpu=False) is what a GPU run uses; building the local spec from it
    raised AssertionError (persist_layer_norm) before any GPU run could start. In a fresh process:
    it initialises torch.distributed."""
    proc = run([sys.executable, "-c", GPU_CONFIG_BUILD], env={"MASTER_PORT": str(free_port())})
    assert int(proc.stdout.strip().splitlines()[-1]) > 0


# ------------------------------------------------------------------------------------------------
# Flex in forward-only runs on CPU: the same losses as blockwise
# ------------------------------------------------------------------------------------------------

SCORING_MODEL = [a for a in TINY_MODEL]
SCORING_MODEL[SCORING_MODEL.index("--seq-length") + 1] = "256"


@pytest.fixture(scope="module")
def trained_tiny(books_data, tmp_path_factory):
    """A tiny model trained a few iterations (so attention is not uniform), and its data."""
    root = tmp_path_factory.mktemp("flex-eval")
    data = [*data_args(*books_data, cache=str(root / "c")), "--split", "50,50,0"]
    ckpt = str(root / "ckpt")
    torchrun(1, [*SCORING_MODEL, *data, "--train-iters", "4", "--lr", "3e-3", "--save", ckpt])
    return ckpt, data, root


@pytest.mark.parametrize("cp", [1, 2])
def test_skip_train_losses_with_flex_equal_blockwise(trained_tiny, cp):
    ckpt, data, root = trained_tiny
    losses, ran = {}, {}
    for backend in ("blockwise", "flex"):
        metrics = str(root / f"skip-{backend}-{cp}.jsonl")
        proc = torchrun(cp, [*SCORING_MODEL, *data, "--load", ckpt, "--finetune", "--skip-train",
                             "--eval-iters", "2", "--packed-documents",
                             "--context-parallel-size", str(cp), "--attention-backend", backend,
                             "--metrics-jsonl", metrics])
        records = read_metrics_file(metrics)
        (run_record,) = [r for r in records if r.get("kind") == "run"]
        (evaluation,) = [r for r in records if r.get("kind") == "eval"]
        losses[backend], ran[backend] = evaluation["eval_loss"], run_record
        assert f"attention: {backend}" in proc.stdout
    assert ran["flex"]["attention_per_layer"] == ["flex", "flex"]
    assert ran["blockwise"]["attention_per_layer"] == ["blockwise", "blockwise"]
    assert ran["flex"]["cp_comm_type"] == ("all_gather" if cp > 1 else None)
    assert rel_diff(losses["flex"], losses["blockwise"]) <= 1e-5, losses


def test_evaluate_with_flex_equals_blockwise(trained_tiny, eval_jsonl, books_data):
    ckpt, _, root = trained_tiny
    model_flags = _model_only(SCORING_MODEL)
    results = {}
    for backend, cp in (("blockwise", 1), ("flex", 1), ("flex", 2)):
        out = str(root / f"eval-{backend}-{cp}")
        run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(cp),
             "--master-port", str(free_port()), "-m", "megatron_ext.evaluate", *model_flags,
             "--load", ckpt, "--eval-data", eval_jsonl, "--output", out,
             "--tasks", "ppl-by-position", "--lengths", "256", "--num-samples", "2",
             "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", books_data[1],
             "--context-parallel-size", str(cp), "--attention-backend", backend,
             "--no-progress"], timeout=900)
        with open(os.path.join(out, "results.json")) as f:
            result = json.load(f)
        assert result["config"]["ran"]["attention_backend"] == backend
        results[(backend, cp)] = result["tasks"]["ppl-by-position"]["256"]["loss"]
    reference = results[("blockwise", 1)]
    assert len(results) == 3
    for loss in results.values():
        assert rel_diff(loss, reference) <= 1e-5, results


def _model_only(train_flags):
    """The architecture flags of a training command line (evaluation takes no training flags)."""
    keep = {"--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads",
            "--num-query-groups", "--untie-embeddings-and-output-weights", "--device"}
    out, i = [], 0
    while i < len(train_flags):
        flag = train_flags[i]
        has_value = i + 1 < len(train_flags) and not train_flags[i + 1].startswith("--")
        if flag in keep:
            out += train_flags[i:i + 1 + has_value]
        i += 1 + has_value
    return out


# ------------------------------------------------------------------------------------------------
# Checkpoints: the local spec's load where TE keeps extra state
# ------------------------------------------------------------------------------------------------

def test_local_checkpoints_load_where_core_attention_keeps_extra_state(tmp_path):
    proc = run([sys.executable, os.path.join(REPO_ROOT, "tests", "extra_state_worker.py"),
                str(tmp_path / "ckpt")], env={"MASTER_PORT": str(free_port())}, timeout=300)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"weights_equal": True, "missing_weight_refused": True,
                      "extra_states_restored": 0}


def test_auto_falls_back_to_blockwise_where_flex_tiles_do_not_fit():
    plan = plan_for(flags("--seq-length", "1000"), on_cpu=False, training=True)
    assert plan.backend == "blockwise"
