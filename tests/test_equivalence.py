"""The same run under TP, DP, PP and CP layouts trains the single-process model.

Every layout starts from scratch with the same seed (layout-invariant initialisation,
``megatron_ext/model/init.py``), trains 5 iterations at lr > 0 from iteration 1 (no warm-up) on
the same global batches of real text in fp32, and must agree with one process on:

* every iteration's loss (<= 1e-6 relative at iteration 1, <= 1e-4 after) and gradient norm;
* every parameter's iteration-1 gradient, gathered to its global (TP=1) shape:
  ||g - g_single|| / ||g_single|| <= 1e-5 per tensor;
* for TP=2 and PP=2, the initial weights as saved in a checkpoint, tensor by tensor.

One probe run per layout (``megatron_ext.verify.probe``: the trainer's own setup and loop) serves
all three checks.
"""

import os

import pytest
import torch

from launch import TINY_MODEL, data_args, probe, rel_diff

pytestmark = pytest.mark.multiprocess

ITERATIONS = 5
# Constant lr from iteration 1: the updates of iterations 1..5 all count.
LR_FROM_ITERATION_1 = ["--lr-warmup-iters", "0", "--lr-decay-style", "constant"]
GRAD_TOLERANCE = 1e-5

TP2, PP2, CP2 = (["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"],
                 ["--context-parallel-size", "2"])
LAYOUTS = {
    "TP=2": (2, TP2),
    "DP=2": (2, []),
    "PP=2": (2, PP2),
    "CP=2": (2, CP2),
    "CP=4": (4, ["--context-parallel-size", "4"]),
    "PP=2xTP=2": (4, PP2 + TP2),
    "PP=2xCP=2": (4, PP2 + CP2),
    "CP=2xTP=2": (4, CP2 + TP2),
    "CP=2xDP=2+distributed-optimizer": (4, CP2 + ["--use-distributed-optimizer"]),
    "TP=2+distributed-optimizer": (2, TP2 + ["--use-distributed-optimizer"]),
    "TP=2+sequence-parallel": (2, TP2 + ["--sequence-parallel"]),
    "DP=2+full-recompute": (2, ["--recompute-granularity", "full"]),
}
# Layouts whose initial weights are also compared through a saved checkpoint.
SAVE_INITIAL = ("TP=2", "PP=2")
FROM_CHECKPOINT = "TP=2 from checkpoint"
# Tied embeddings under PP: the last stage's output layer is a copy of the first stage's
# embedding (drawn under the embedding's name, gradients summed across the stages).
TIED = {"PP=2 tied embeddings": (2, PP2)}
TIED_REFERENCE = "single tied embeddings"
CHECKED = [*LAYOUTS, FROM_CHECKPOINT, *TIED]


def reference_of(layout: str) -> str:
    return TIED_REFERENCE if layout in TIED else "single"


class Runs:
    """Each layout's probe run, made when a test first asks for it (one run serves the loss,
    gradient and weight checks; a failing layout fails its own tests only)."""

    def __init__(self, root, args):
        self.root, self.args, self.done = root, args, {}

    def __getitem__(self, name):
        if name not in self.done:
            nproc, extra = ((1, []) if name in ("single", TIED_REFERENCE)
                            else {**LAYOUTS, **TIED}.get(name, (2, TP2)))
            if name == FROM_CHECKPOINT:
                # The old way still works: one process's checkpoint, resharded by --finetune.
                extra = [*extra, "--load", self["single"]["init"], "--finetune"]
            out = self.root / name.replace("=", "").replace("+", "_").replace(" ", "_")
            save = ["--save-initial-checkpoint"] if name in ("single", *SAVE_INITIAL) else []
            args = self.args
            if name in (TIED_REFERENCE, *TIED):
                args = [a for a in args if a != "--untie-embeddings-and-output-weights"]
            self.done[name] = {**probe(nproc, out, [*args, *extra, *save]),
                               "init": str(out / "init")}
        return self.done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, books_data):
    root = tmp_path_factory.mktemp("equivalence")
    return Runs(root, [*TINY_MODEL, *data_args(*books_data, cache=str(root / "index-cache")),
                       *LR_FROM_ITERATION_1, "--train-iters", str(ITERATIONS)])


def test_reference_run_trains(runs):
    reference = runs["single"]["metrics"]
    assert [r["iteration"] for r in reference] == list(range(1, ITERATIONS + 1))
    # lr > 0 from iteration 1: the model moves at once, so iteration 2's loss already differs.
    assert reference[0]["lr"] > 0
    assert len({round(r["loss"], 6) for r in reference}) == ITERATIONS
    # Every parameter gets a gradient, so the per-parameter comparison is not vacuous.
    grads = runs["single"]["grads"]
    assert len(grads) >= 10
    assert all(g.norm() > 0 for g in grads.values()), [k for k, g in grads.items() if g.norm() == 0]


@pytest.mark.parametrize("layout", CHECKED)
def test_losses_and_grad_norms_match_single_process(runs, layout):
    reference, other = runs[reference_of(layout)]["metrics"], runs[layout]["metrics"]
    assert [r["iteration"] for r in other] == list(range(1, ITERATIONS + 1))
    for key in ("loss", "grad_norm"):
        diffs = [rel_diff(got[key], ref[key]) for ref, got in zip(reference, other)]
        print(f"\n{layout}: relative {key} differences per iteration "
              f"{['%.1e' % d for d in diffs]}")
    for ref, got in zip(reference, other):
        tolerance = 1e-6 if ref["iteration"] == 1 else 1e-4
        assert ref["loss_tokens"] == got["loss_tokens"]
        assert rel_diff(got["loss"], ref["loss"]) <= tolerance, (layout, ref, got)
        assert rel_diff(got["grad_norm"], ref["grad_norm"]) <= tolerance, (layout, ref, got)


@pytest.mark.parametrize("layout", CHECKED)
def test_every_parameter_gradient_matches_single_process(runs, layout):
    reference, other = runs[reference_of(layout)]["grads"], runs[layout]["grads"]
    assert sorted(other) == sorted(reference)
    diffs = {name: ((other[name].double() - ref.double()).norm() / ref.double().norm()).item()
             for name, ref in reference.items()}
    worst = max(diffs, key=diffs.get)
    print(f"\n{layout}: largest relative gradient difference {diffs[worst]:.2e} ({worst})")
    assert diffs[worst] <= GRAD_TOLERANCE, (layout, worst, diffs[worst])


def saved_weights(checkpoint: str) -> dict:
    """The model tensors of a torch_dist checkpoint, each in its global shape (read in one
    process by torch's own reader, not by our loading code)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = os.path.join(checkpoint, "flat.pt")
    dcp_to_torch_save(os.path.join(checkpoint, "iter_0000000"), flat)
    state = torch.load(flat, weights_only=False)
    return {k: v for k, v in state.items()
            if isinstance(v, torch.Tensor) and k.startswith(("embedding.", "decoder.", "output_"))
            and "_extra_state" not in k}


@pytest.mark.parametrize("layout", SAVE_INITIAL)
def test_initial_weights_equal_single_process(runs, layout):
    reference, other = saved_weights(runs["single"]["init"]), saved_weights(runs[layout]["init"])
    # 9 tensors: embedding, output layer, final norm and six stacked per-layer tensors.
    assert len(reference) == 9 and sorted(other) == sorted(reference)
    for name, tensor in reference.items():
        assert torch.equal(other[name], tensor), name


def test_initial_weights_follow_megatron_rules(runs):
    """Megatron-Core's init rules, checked on the saved single-process weights: N(0, 0.02) for
    matrices, 0.02 / sqrt(2 * num_layers) for the output projections, ones for the norms."""
    weights = saved_weights(runs["single"]["init"])
    num_layers = TINY_MODEL[TINY_MODEL.index("--num-layers") + 1]
    for name, tensor in weights.items():
        if "norm" in name:  # final_layernorm.weight, the layer_norm_weight of each layer
            assert torch.equal(tensor, torch.ones_like(tensor)), name
            continue
        scaled = "linear_proj" in name or "linear_fc2" in name
        std = 0.02 / (2 * int(num_layers)) ** 0.5 if scaled else 0.02
        assert abs(tensor.std().item() / std - 1) < 0.05 and abs(tensor.mean().item()) < std / 20, (
            name, tensor.std().item(), std)
