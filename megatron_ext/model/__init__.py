from megatron_ext.model.builder import build_model, layer_spec, transformer_config  # noqa: F401
