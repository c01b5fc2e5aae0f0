"""The model: a Llama-family GPTModel, its attention backends, RoPE from position ids.

``build_model``, ``layer_spec`` and ``transformer_config`` are loaded on first use, so light
modules (flag parsing, ``attention_backends``) import without Megatron-Core's model code.
"""

_BUILDER_NAMES = ("build_model", "layer_spec", "transformer_config")


def __getattr__(name):
    if name in _BUILDER_NAMES:
        from megatron_ext.model import builder

        return getattr(builder, name)
    raise AttributeError(f"module 'megatron_ext.model' has no attribute {name!r}")
