"""One Layout: training, evaluation and conversion accept and refuse layouts by the same rules."""

import ast
import os

import pytest

from launch import REPO_ROOT
from megatron_ext import arguments
from megatron_ext.checkpoints.convert.errors import ConversionError
from megatron_ext.errors import ArgumentError, UserError
from megatron_ext.evaluate import cli as evaluate_cli
from megatron_ext.parallel.layout import HF_NAMES, Layout


def test_layout_rules():
    layout = Layout(tp=2, pp=2, cp=2, world_size=16)
    assert layout.dp == 2
    layout.check_model(heads=32, groups=8, ffn=14336, layers=32)
    layout.check_sequence(65536)
    with pytest.raises(ArgumentError, match=r"world size 12 is not divisible .* = 8"):
        Layout(tp=2, pp=2, cp=2, world_size=12)
    with pytest.raises(ArgumentError, match=r"--ffn-hidden-size \(14337\) must be divisible by "
                                            r"--tensor-model-parallel-size \(2\)"):
        layout.check_model(heads=32, groups=8, ffn=14337, layers=32)
    with pytest.raises(ArgumentError, match=r"--num-layers \(31\) .* --pipeline-model-parallel"):
        layout.check_model(heads=32, groups=8, ffn=14336, layers=31)
    with pytest.raises(ArgumentError, match=r"--seq-length \(65538\) must be divisible by 2 x"):
        layout.check_sequence(65538)
    with pytest.raises(ConversionError, match=r"num_key_value_heads \(3\) must be divisible"):
        Layout(tp=2, error=ConversionError).check_model(heads=6, groups=3, ffn=64, layers=2,
                                                        names=HF_NAMES)
    assert issubclass(ConversionError, UserError) and issubclass(ArgumentError, UserError)


@pytest.mark.parametrize("heads, groups, message", [
    (4, 2, r"--num-attention-heads \(4\) must be divisible by --tensor-model-parallel-size \(8\)"),
    (8, 8, r"--ffn-hidden-size \(100\) must be divisible by --tensor-model-parallel-size \(8\)"),
])
def test_training_and_evaluation_refuse_alike(heads, groups, message):
    """Evaluation used to skip the head and FFN rules; both now go through Layout."""
    flags = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", str(heads),
             "--num-query-groups", str(groups), "--ffn-hidden-size", "100",
             "--tensor-model-parallel-size", "8"]
    train_args = arguments.build_parser().parse_args(flags + ["--seq-length", "64"])
    with pytest.raises(ArgumentError, match=message):
        arguments.finalize(train_args, 8)
    eval_args = evaluate_cli.build_parser().parse_args(
        flags + ["--eval-data", "x", "--output", "y", "--tokenizer-type",
                 "SentencePieceTokenizer", "--tokenizer-model", "z"])
    with pytest.raises(ArgumentError, match=message):
        evaluate_cli.finalize(eval_args, 8)


def _import_graph(package_dir):
    """module -> the package modules it imports (module level or inside functions)."""
    modules = {}
    for folder, _, files in os.walk(package_dir):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(package_dir))[:-3].replace(os.sep, ".")
                modules[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    graph = {}
    for module, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron_ext"):
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                         else node.module for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("megatron_ext")}
        # A package's __init__ is not an edge: importing a.b runs a/__init__ but a does not
        # depend on a.b's siblings through it.
        graph[module] = {d for d in deps if d in modules and d != module
                         and not module.startswith(d + ".") and d != "megatron_ext"}
    return graph


def _cycles(graph):
    seen, on_path, cycles = set(), [], []

    def visit(node):
        if node in on_path:
            cycles.append(on_path[on_path.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        on_path.append(node)
        for dep in sorted(graph[node]):
            visit(dep)
        on_path.pop()

    for node in sorted(graph):
        visit(node)
    return cycles


def test_no_import_cycles_in_the_package():
    """Function-local imports included: arguments -> evaluate.training_hook -> evaluate.cli ->
    arguments and convert.tables <-> convert.hf_config were the ones found before."""
    assert _cycles(_import_graph(os.path.join(REPO_ROOT, "megatron_ext"))) == []


def test_the_cycle_check_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
