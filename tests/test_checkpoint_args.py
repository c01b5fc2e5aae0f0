"""--use-checkpoint-args: the model comes from the checkpoint's model_args.json."""

import json
import sys

import pytest

from launch import TINY_MODEL, data_args, read_metrics, run

pytestmark = pytest.mark.multiprocess

ARCHITECTURE = ("--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads",
                "--num-query-groups", "--seq-length")


YARN = ("--position-embedding-type", "yarn", "--rotary-scaling-factor", "4",
        "--yarn-original-max-position-embeddings", "32", "--yarn-beta-fast", "16",
        "--no-yarn-correction-range-round-to-int")


def _without_architecture(args):
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ARCHITECTURE:
            skip = True
        elif arg != "--untie-embeddings-and-output-weights":
            out.append(arg)
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory, books_data):
    root = tmp_path_factory.mktemp("ckpt-args")
    data = data_args(*books_data, cache=str(root / "index-cache"))
    # Trained with YaRN (non-default keys included), so the RoPE scaling must travel too.
    run([sys.executable, "-m", "megatron_ext.train", *TINY_MODEL, *YARN, *data,
         "--train-iters", "2", "--save", str(root / "ckpt")])
    return root, data


def test_evaluate_takes_the_model_from_the_checkpoint(saved, books_data):
    root, _ = saved
    run([sys.executable, "-m", "megatron_ext.evaluate", "--load", str(root / "ckpt"),
         "--use-checkpoint-args", "--tokenizer-type", "SentencePieceTokenizer",
         "--tokenizer-model", books_data[1], "--eval-data", books_data[0], "--output",
         str(root / "eval"), "--tasks", "ppl-by-position", "--lengths", "64", "--num-samples", "1",
         "--device", "cpu", "--no-progress"])
    model = json.loads((root / "eval" / "results.json").read_text())["config"]["model"]
    assert (model["num_layers"], model["hidden_size"], model["ffn_hidden_size"],
            model["num_query_groups"], model["untie_embeddings_and_output_weights"]) == (
                2, 64, 128, 2, True)
    assert (model["position_embedding_type"], model["rotary_scaling_factor"],
            model["yarn_original_max_position_embeddings"], model["yarn_beta_fast"],
            model["yarn_correction_range_round_to_int"]) == ("yarn", 4.0, 32, 16.0, False)


def test_finetune_takes_the_model_from_the_checkpoint(saved):
    root, data = saved
    args = _without_architecture(TINY_MODEL)
    assert "--hidden-size" not in args
    metrics = root / "ft.jsonl"
    run([sys.executable, "-m", "megatron_ext.train", *args, *data, "--train-iters", "1",
         "--lr-warmup-iters", "0", "--load", str(root / "ckpt"), "--finetune", "--use-checkpoint-args",
         "--metrics-jsonl", str(metrics)])
    assert [r["iteration"] for r in read_metrics(str(metrics))] == [1]


@pytest.mark.parametrize("hidden", ["96", "128"])  # 128 is the parser's default, still explicit
def test_contradicting_flag_is_refused(saved, capsys, hidden):
    from megatron_ext import arguments

    root, data = saved
    args = _without_architecture(TINY_MODEL)
    with pytest.raises(SystemExit) as stop:
        arguments.parse([*args, *data, "--load", str(root / "ckpt"), "--use-checkpoint-args",
                         "--finetune", "--hidden-size", hidden], world_size=1)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert f"--hidden-size {hidden} contradicts the checkpoint" in err and "drop --hidden-size" in err
