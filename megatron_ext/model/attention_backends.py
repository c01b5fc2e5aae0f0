"""Which layer spec and core attention a run uses: decided once from the flags, before any work.

Every backend computes the same thing: causal attention by each token's *global* index (in
Megatron's load-balanced context-parallel layout), restricted to the token's document and, for
shared-prefix preference rows, to its branch plus the shared prompt. They differ in engine only:

* ``flex``: ``torch.nn.attention.flex_attention`` under ``torch.compile`` (fused, block-sparse;
  the GPU default). On CPU only its forward exists, so it serves evaluation and ``--skip-train``.
* ``blockwise``: the same masks in plain torch, blockwise with a log-sum-exp merge (the CPU
  training path and the reference). ``torch`` is its former name and still accepted.
* ``te``: Transformer Engine's ``DotProductAttention`` with its own context parallelism. Only for
  what it does exactly (plain causal attention); documents, SFT and preference branches are
  refused, naming ``--attention-backend flex``, because TE would drop the document ids.

``auto`` picks flex on CUDA (blockwise when this torch has no FlexAttention, or when a CP chunk is
not a multiple of flex's 128-token tile) and blockwise on CPU; it never picks TE, whose CP would
silently drop a mask. The start-up line says which one ran.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from megatron_ext.config import ModelConfig
from megatron_ext.errors import ArgumentError
from megatron_ext.parallel.layout import Layout

BACKEND_CHOICES = ("auto", "flex", "blockwise", "te", "torch")
BACKEND_ALIASES = {"torch": "blockwise"}
# Transformer Engine's names for its context-parallel exchanges; Megatron-LM's help text says
# "allgather", which TE rejects at the first forward, so that spelling is translated.
CP_COMM_CHOICES = ("p2p", "a2a", "all_gather", "a2a+p2p", "allgather")
CP_COMM_ALIASES = {"allgather": "all_gather"}
# FlexAttention's kernel tile on CUDA: a CP chunk (or the whole sequence at CP=1) must be a
# multiple of it, so no tile straddles two chunks and the kernel needs no ragged tail.
FLEX_BLOCK_TOKENS = 128
# The blockwise backend's default cap: a [b, heads, 1024, 1024] fp32 score tile, not a CP chunk.
DEFAULT_BLOCK_TOKENS = 1024
TE_SPEC, LOCAL_SPEC = "transformer_engine", "local"


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """What the model will be built with."""

    layer_spec: str  # "transformer_engine" or "local"
    backend: str  # "flex", "blockwise" or "te"
    cp_comm_type: Optional[str]  # the exchange used when CP > 1 (ours: "all_gather")
    block_size: Optional[int] = None  # blockwise: tokens per block (None: the default cap)
    hierarchical_cp_sizes: Optional[tuple] = None  # TE's a2a+p2p: (a2a size, p2p size)


def te_available() -> bool:
    """Transformer Engine usable the way Megatron-Core decides it (``HAVE_TE`` of its TE
    extension and of the GPT layer specs), not merely ``import transformer_engine``: that
    succeeds when TE's torch extension is missing or built for another torch."""
    try:
        import transformer_engine.pytorch  # noqa: F401
        from megatron.core.extensions import transformer_engine as megatron_te
        from megatron.core.models.gpt import gpt_layer_specs
    except Exception:  # ImportError, or OSError / RuntimeError from a broken TE build
        return False
    return bool(getattr(megatron_te, "HAVE_TE", False) and getattr(gpt_layer_specs, "HAVE_TE", False))


def flex_available() -> bool:
    """FlexAttention (torch >= 2.5) and, for its compiled kernels on CUDA, Triton."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def normalized_backend(name: str) -> str:
    return BACKEND_ALIASES.get(name, name)


def plan_attention(model: ModelConfig, layout: Layout, on_cpu: bool, training: bool,
                   seq_lengths: Optional[Sequence[int]] = None,
                   document_masks: Optional[str] = None) -> AttentionPlan:
    """Validate the attention flags for this device and return what will be built.

    ``training``: backward passes will run (flex has none on CPU). ``seq_lengths``: the sequence
    lengths the model will see (default ``--seq-length``). ``document_masks``: what asks for
    document / branch masks (``RunConfig.document_masking_source``), None for plain causal.
    Raises ``ArgumentError`` naming the flag.
    """
    layer = _layer_spec(model.transformer_impl, on_cpu)
    requested = normalized_backend(model.attention_backend)
    cp = layout.cp
    lengths = seq_lengths or [model.seq_length]
    if requested == "auto":
        backend = ("flex" if not on_cpu and flex_available() and _fits_flex_tiles(lengths, cp)
                   else "blockwise")
    else:
        backend = requested
    if backend == "te":
        _check_te(model, layout, layer, document_masks)
    else:
        _check_ours(model, layout, backend, on_cpu, training, lengths)
    comm = _cp_comm_type(layout, backend)
    return AttentionPlan(
        layer_spec=layer, backend=backend, cp_comm_type=comm if cp > 1 else None,
        block_size=model.attention_block_size if backend == "blockwise" else None,
        hierarchical_cp_sizes=(tuple(layout.hierarchical_context_parallel_sizes)
                               if comm == "a2a+p2p" else None))


def _layer_spec(impl: str, on_cpu: bool) -> str:
    if impl == TE_SPEC:
        if on_cpu or not te_available():
            raise ArgumentError("--transformer-impl transformer_engine needs a GPU and a working "
                                "Transformer Engine (transformer_engine.pytorch importable for "
                                "this torch); use --transformer-impl local")
        return TE_SPEC
    return TE_SPEC if impl == "auto" and not on_cpu and te_available() else LOCAL_SPEC


def _check_te(model: ModelConfig, layout: Layout, layer: str,
              document_masks: Optional[str]) -> None:
    cp = layout.cp
    if layer != TE_SPEC:
        raise ArgumentError("--attention-backend te needs the Transformer Engine layer spec (a GPU "
                            "with Transformer Engine installed for this torch); use "
                            "--attention-backend flex")
    if document_masks:
        raise ArgumentError(
            f"--attention-backend te cannot keep packed documents apart here ({document_masks}): "
            f"Transformer "
            f"Engine takes them only as THD cu_seqlens, which this project has not proven on a "
            f"GPU, and would otherwise attend across documents silently; use --attention-backend "
            f"flex (exact document and branch masks, fused)")
    if model.attention_block_size is not None:
        raise ArgumentError("--attention-block-size sizes the blockwise backend's tiles; drop it "
                            "with --attention-backend te")
    comm = _cp_comm_type(layout, "te")
    sizes = layout.hierarchical_context_parallel_sizes
    heads_per_tp = model.num_attention_heads // layout.tp
    if cp > 1 and comm == "a2a" and heads_per_tp % cp:
        raise ArgumentError(
            f"--cp-comm-type a2a exchanges whole heads: attention heads per tensor-parallel rank "
            f"({model.num_attention_heads} / --tensor-model-parallel-size "
            f"{layout.tp} = {heads_per_tp}) must be divisible by "
            f"--context-parallel-size ({cp}); use --cp-comm-type p2p or change the sizes")
    if cp > 1 and comm == "a2a+p2p":
        if not sizes:
            raise ArgumentError(
                "--cp-comm-type a2a+p2p needs --hierarchical-context-parallel-sizes A P (a2a group "
                "size, then p2p group size, A x P = --context-parallel-size); without it Transformer "
                "Engine gets no context-parallel group and every rank attends to its own chunks")
        if len(sizes) != 2 or sizes[0] * sizes[1] != cp:
            raise ArgumentError(
                f"--hierarchical-context-parallel-sizes {' '.join(map(str, sizes))}: give two "
                f"sizes whose product is --context-parallel-size ({cp})")
        if heads_per_tp % sizes[0]:
            raise ArgumentError(
                f"--cp-comm-type a2a+p2p: attention heads per tensor-parallel rank ({heads_per_tp}) "
                f"must be divisible by the a2a size ({sizes[0]}, the first of "
                f"--hierarchical-context-parallel-sizes)")
    elif sizes:
        raise ArgumentError("--hierarchical-context-parallel-sizes applies to --cp-comm-type "
                            "a2a+p2p with --attention-backend te only; drop it")


def _check_ours(model: ModelConfig, layout: Layout, backend: str, on_cpu: bool, training: bool,
                seq_lengths: Sequence[int]) -> None:
    cp = layout.cp
    if model.attention_dropout:
        raise ArgumentError(f"--attention-dropout {model.attention_dropout}: the {backend} attention "
                            f"backend has no attention dropout (long-context training uses 0); "
                            f"set --attention-dropout 0")
    if layout.hierarchical_context_parallel_sizes:
        raise ArgumentError("--hierarchical-context-parallel-sizes applies to --cp-comm-type "
                            "a2a+p2p with --attention-backend te only; drop it")
    if backend == "blockwise":
        return
    if model.attention_block_size is not None:
        raise ArgumentError("--attention-block-size sizes the blockwise backend's tiles; flex "
                            "picks its own (drop the flag or use --attention-backend blockwise)")
    if not flex_available():
        raise ArgumentError("--attention-backend flex needs torch >= 2.5 "
                            "(torch.nn.attention.flex_attention); use --attention-backend blockwise")
    if on_cpu and training:
        raise ArgumentError("--attention-backend flex has no backward on CPU (FlexAttention's CPU "
                            "kernel is forward-only): use it on CPU for evaluation (--skip-train, "
                            "python -m megatron_ext.evaluate) and train on CPU with "
                            "--attention-backend blockwise")
    if on_cpu:
        return
    for length in seq_lengths:
        chunk = length // (2 * cp) if cp > 1 else length
        if chunk % FLEX_BLOCK_TOKENS:
            unit = 2 * cp * FLEX_BLOCK_TOKENS if cp > 1 else FLEX_BLOCK_TOKENS
            raise ArgumentError(
                f"--attention-backend flex on CUDA needs each context-parallel chunk "
                f"(--seq-length {length}" + (f" / (2 x --context-parallel-size {cp})" if cp > 1
                                               else "") +
                f" = {chunk} tokens) to be a multiple of its {FLEX_BLOCK_TOKENS}-token kernel tile: "
                f"use a --seq-length that is a multiple of {unit}, or --attention-backend blockwise")


def _fits_flex_tiles(seq_lengths: Sequence[int], cp: int) -> bool:
    return all((length // (2 * cp) if cp > 1 else length) % FLEX_BLOCK_TOKENS == 0
               for length in seq_lengths)


def _cp_comm_type(layout: Layout, backend: str) -> str:
    given = CP_COMM_ALIASES.get(layout.cp_comm_type, layout.cp_comm_type)
    if backend == "te":
        return given or "p2p"
    if given not in (None, "all_gather") and layout.cp > 1:
        raise ArgumentError(
            f"--cp-comm-type {given} is a Transformer Engine exchange (--attention-backend te); "
            f"the {backend} backend always all-gathers keys and values over the context-parallel "
            f"group: drop --cp-comm-type (or pass all_gather)")
    return "all_gather"


# ------------------------------------------------------------------------------------------------
# Saying what ran: read from the built model, not from the flags
# ------------------------------------------------------------------------------------------------

def what_ran(model, device_type: str, cp_size: int) -> dict:
    """The layer spec, core attention per layer, parameter dtype and CP exchange of ``model``
    (this rank's stage), found by walking its modules."""
    per_layer, exchanges, te_modules = {}, set(), False
    for name, module in model.named_modules():
        cls = type(module)
        if cls.__module__.startswith("megatron.core.extensions.transformer_engine"):
            te_modules = True
        if name.endswith("core_attention"):
            backend = getattr(cls, "backend_name", cls.__name__)
            layer = getattr(module, "layer_number", len(per_layer) + 1)
            per_layer[int(layer)] = backend
            if cp_size > 1:
                exchanges.add(getattr(module, "cp_comm_type", None) if backend == "te"
                              else "all_gather")
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    backends = sorted(set(per_layer.values()))
    return {
        "device": device_type,
        "layer_spec": TE_SPEC if te_modules else LOCAL_SPEC,
        "attention_backend": backends[0] if len(backends) == 1 else "mixed",
        "attention_per_layer": [per_layer[k] for k in sorted(per_layer)],
        "params_dtype": dtypes[0] if len(dtypes) == 1 else "mixed:" + ",".join(dtypes),
        "cp_comm_type": (sorted(exchanges)[0] if len(exchanges) == 1 else
                         "mixed" if exchanges else None),
    }


def describe_what_ran(ran: dict) -> str:
    layers = ran["attention_per_layer"]
    return (f"layer spec: {ran['layer_spec']} | attention: {ran['attention_backend']} "
            f"({len(layers)} layers on this rank's stage: {','.join(layers)}) | params dtype: "
            f"{ran['params_dtype']} | CP exchange: {ran['cp_comm_type'] or 'none (CP=1)'}")
