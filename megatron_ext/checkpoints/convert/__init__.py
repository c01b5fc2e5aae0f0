"""Checkpoint conversion between Hugging Face folders and Megatron-Core torch_dist checkpoints.

One declarative mapping table per model family (``tables.py``: Llama, Mistral, Qwen2/2.5, Qwen3) with the
tensor transforms it names (``transforms.py``), applied in either direction by ``engine.py``;
configs are read by ``hf_config.py`` and mapped to ours by one two-way table (``architecture.py``). ``import_hf.py`` / ``export_hf.py`` stream tensors
between safetensors (``hf_io.py``) and Megatron's torch_dist format (``megatron_ckpt.py``);
``parity.py`` compares logits. Command line: ``tools/convert_checkpoint.py {hf-to-megatron,
megatron-to-hf, verify}``. The entry points below import Megatron lazily, so ``model_flags`` stays
cheap to import.
"""

from megatron_ext.checkpoints.convert.architecture import model_flags  # noqa: F401
from megatron_ext.checkpoints.convert.hf_config import ConversionError, ModelSpec, read_hf_config  # noqa: F401
from megatron_ext.checkpoints.convert.tables import FAMILIES  # noqa: F401


def hf_to_megatron(*args, **kwargs):
    """See ``import_hf.hf_to_megatron``."""
    from megatron_ext.checkpoints.convert.import_hf import hf_to_megatron as run

    return run(*args, **kwargs)


def megatron_to_hf(*args, **kwargs):
    """See ``export_hf.megatron_to_hf``."""
    from megatron_ext.checkpoints.convert.export_hf import megatron_to_hf as run

    return run(*args, **kwargs)


def verify(*args, **kwargs):
    """See ``parity.verify``."""
    from megatron_ext.checkpoints.convert.parity import verify as run

    return run(*args, **kwargs)
