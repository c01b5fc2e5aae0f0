"""The typed run configuration: every flag in one frozen section, one table for conversions."""

import ast
import dataclasses
import os

import pytest

from megatron_ext import arguments, config
from megatron_ext.checkpoints import checkpointing
from megatron_ext.checkpoints.convert import architecture
from megatron_ext.checkpoints.convert.hf_config import read_hf_config
from megatron_ext.evaluate import training_hook
from megatron_ext.objectives.preference import PreferenceOptions

PACKAGE = os.path.join(os.path.dirname(__file__), "..", "megatron_ext")

# Flag dests the Layout holds under its own short names.
LAYOUT_FLAGS = {"tensor_model_parallel_size", "pipeline_model_parallel_size",
                "context_parallel_size", "sequence_parallel", "cp_comm_type",
                "hierarchical_context_parallel_sizes"}
SECTIONS = {"model": config.ModelConfig, "distributed": config.DistributedConfig,
            "data": config.DataConfig, "training": config.TrainingConfig,
            "checkpoint": config.CheckpointConfig, "logging": config.LoggingConfig,
            "objective.options (preference)": PreferenceOptions,
            "extras['eval_tasks']": training_hook.EvalTasksOptions}
# Filled while the flags are read, not flags themselves.
DERIVED = {"data_blend", "num_microbatches", "padded_vocab_size"}


def _parser():
    return arguments.build_parser(providers=[training_hook.PROVIDER])


def test_every_flag_lands_in_exactly_one_section():
    dests = {a.dest for a in _parser()._actions if a.dest != "help"}
    homes = {}
    for name, cls in SECTIONS.items():
        for field in dataclasses.fields(cls):
            homes.setdefault(field.name, []).append(name)
    for dest in LAYOUT_FLAGS:
        homes.setdefault(dest, []).append("layout")
    homes.setdefault("objective", []).append("objective.name")
    assert {d: h for d, h in homes.items() if len(h) > 1} == {}
    assert sorted(dests - set(homes)) == [], "flags no section holds (they would be dropped)"
    assert sorted(set(homes) - dests - DERIVED) == [], "section fields no flag fills"


def test_section_defaults_are_the_parsers():
    defaults = vars(_parser().parse_args([]))
    for cls in SECTIONS.values():
        for field in dataclasses.fields(cls):
            if field.default is dataclasses.MISSING or field.name not in defaults:
                continue
            parsed = defaults[field.name]
            parsed = tuple(parsed) if isinstance(parsed, list) else parsed
            assert parsed == field.default, (cls.__name__, field.name)


def test_finalize_returns_a_frozen_config(demo_data):
    data_path, spm = demo_data
    cfg = arguments.parse(["--num-layers", "2", "--hidden-size", "96", "--num-attention-heads",
                           "6", "--num-query-groups", "2", "--seq-length", "128",
                           "--data-path", *data_path.split(), "--tokenizer-type",
                           "SentencePieceTokenizer", "--tokenizer-model", spm,
                           "--global-batch-size", "4", "--packed-documents"],
                          world_size=2, providers=[training_hook.PROVIDER])
    # Megatron-LM's derived defaults, computed once: 8/3 x 96 rounded up to 64, heads / hidden.
    assert (cfg.model.ffn_hidden_size, cfg.model.kv_channels) == (256, 16)
    assert (cfg.layout.dp, cfg.training.num_microbatches) == (2, 2)
    assert cfg.model.max_position_embeddings == 128 and cfg.data.target_seq_length == 128
    assert cfg.document_masking_source == "--packed-documents / --reset-attention-mask"
    assert cfg.extras["eval_tasks"].eval_tasks is None
    for section, field in ((cfg, "model"), (cfg.model, "hidden_size"), (cfg.layout, "tp"),
                           (cfg.training, "lr"), (cfg.data, "split")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(section, field, None)
    wider = cfg.with_vocab(32000)
    assert wider.model.padded_vocab_size == 32000 and cfg.model.padded_vocab_size is None


# Modules that read flags (the edge) may fill the parsed namespace; nothing else may assign
# to a configuration object's attributes.
EDGE_MODULES = {"arguments.py", os.path.join("evaluate", "cli.py"),
                os.path.join("commands", "reference_logps.py"),  # fixes its scoring flags
                os.path.join("objectives", "language_model.py"),
                os.path.join("objectives", "preference.py")}


def _config_assignments(path):
    tree = ast.parse(open(path).read(), path)
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr"
              and node.args and isinstance(node.args[0], ast.Name)):
            targets = [ast.Attribute(value=node.args[0], attr="?")]
        for target in targets:
            for sub in ast.walk(target):
                if (isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name)
                        and sub.value.id in ("args", "cfg")):
                    found.append(f"{path}:{getattr(node, 'lineno', '?')} {sub.value.id}.{sub.attr}")
    return found


def test_nothing_outside_the_edge_mutates_configuration():
    offenders = []
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, PACKAGE)
            if name.endswith(".py") and relative not in EDGE_MODULES:
                offenders += _config_assignments(path)
    assert offenders == []


SMOLLM2_LIKE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "head_dim": 64, "hidden_act": "silu",
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    "vocab_size": 49152, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0,
                                             "factor": 32.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 8192}}


@pytest.mark.parametrize("hf", [
    SMOLLM2_LIKE,
    {**SMOLLM2_LIKE, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
     "tie_word_embeddings": False, "rope_parameters": {"rope_type": "linear", "factor": 4.0,
                                                       "rope_theta": 1e6}},
    # Qwen3: q/k norms, head_dim 128 != hidden / heads (64)
    {**SMOLLM2_LIKE, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
     "hidden_size": 576, "num_attention_heads": 9, "head_dim": 128,
     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
    # Llama-3 scaling with non-default parameters (our --rope-scaling-* flags).
    {**SMOLLM2_LIKE, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 16.0,
                                         "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                                         "original_max_position_embeddings": 1024}},
    # YaRN as Qwen2.5 ships it, and with every optional key (truncate off: a --no- flag).
    {**SMOLLM2_LIKE, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
     "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                         "original_max_position_embeddings": 2048}},
    {**SMOLLM2_LIKE, "rope_parameters": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 1e6,
                                         "original_max_position_embeddings": 1024,
                                         "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 1.5,
                                         "mscale_all_dim": 0.5, "attention_factor": 1.25,
                                         "truncate": False}},
])
def test_the_table_agrees_with_the_training_flags_both_ways(hf):
    spec = read_hf_config(hf)
    direct = architecture.model_config(spec, padded_vocab_size=49152)
    # The flags the converter writes, read back by the training parser, give the same model.
    flags = architecture.model_flags(spec) + ["--seq-length", str(direct.seq_length)]
    parsed, _ = arguments.model_and_layout(_parser().parse_args(flags), world_size=1)
    mismatched = {f.name: (getattr(parsed, f.name), getattr(direct, f.name))
                  for f in dataclasses.fields(config.ModelConfig)
                  if f.name not in ("padded_vocab_size", "transformer_impl",
                                    "group_query_attention", "disable_bias_linear")
                  and getattr(parsed, f.name) != getattr(direct, f.name)}
    assert mismatched == {}
    # model_args.json -> spec -> the same architecture and RoPE scaling.
    record = checkpointing.model_record(direct)
    back = architecture.spec_from_model_args(record)
    for row in architecture.TABLE:
        assert getattr(back, row.spec) == getattr(spec, row.spec), row
    assert back.rope_scaling == spec.rope_scaling
    assert architecture.spec_matches_model_args(spec, record) == []
    # A checkpoint of another model is told apart, field by field.
    other = dict(record, num_layers=29, untie_embeddings_and_output_weights=not
                 record["untie_embeddings_and_output_weights"])
    diffs = architecture.spec_matches_model_args(spec, other)
    assert [d.split(":")[0] for d in diffs] == ["num_layers", "untie_embeddings_and_output_weights"]
