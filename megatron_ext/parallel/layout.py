"""The parallel layout, TP x PP x CP x DP, and every rule that ties it to a model and a sequence.

Training, evaluation, checkpoint conversion and batch inspection all ask this one object, so a
layout is accepted or refused the same way everywhere, with the same flag-naming messages:

    layout = Layout(tp=2, pp=1, cp=2, world_size=8)        # world size not divisible: refused
    layout.check_model(heads=32, groups=8, ffn=14336, layers=32)
    layout.check_sequence(65536)                            # the load-balanced CP layout
    layout.dp                                               # 2

Process groups are created elsewhere (``parallel.py``); this module only decides what is valid.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Tuple, Type

from megatron_ext.parallel import launch
from megatron_ext.errors import ArgumentError, UserError

TP_FLAG = "--tensor-model-parallel-size"
PP_FLAG = "--pipeline-model-parallel-size"
CP_FLAG = "--context-parallel-size"

# How each model dimension is named in messages: training flags, or Hugging Face config fields.
FLAG_NAMES = {"heads": "--num-attention-heads", "groups": "--num-query-groups",
              "ffn": "--ffn-hidden-size", "layers": "--num-layers"}
HF_NAMES = {"heads": "num_attention_heads", "groups": "num_key_value_heads",
            "ffn": "intermediate_size", "layers": "num_hidden_layers"}


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    world_size: Optional[int] = None  # None: one model replica (dp = 1), e.g. for conversion
    sequence_parallel: bool = False  # Megatron's: activations split over TP (needs TP > 1)
    cp_comm_type: Optional[str] = None  # --cp-comm-type as given; the attention plan decides
    hierarchical_context_parallel_sizes: Optional[Tuple[int, ...]] = None  # a2a+p2p groups
    error: Type[UserError] = ArgumentError  # what a refusal raises (the converter's own type)

    def __post_init__(self):
        for flag, value in ((TP_FLAG, self.tp), (PP_FLAG, self.pp), (CP_FLAG, self.cp)):
            if value < 1:
                raise self.error(f"{flag} must be >= 1, got {value}")
        model_parallel = self.tp * self.pp * self.cp
        if self.world_size is not None and self.world_size % model_parallel:
            raise self.error(
                f"world size {self.world_size} is not divisible by {TP_FLAG} ({self.tp}) x "
                f"{PP_FLAG} ({self.pp}) x {CP_FLAG} ({self.cp}) = {model_parallel}; launch a "
                f"multiple of {model_parallel} processes or change those flags")

    @classmethod
    def from_args(cls, args, world_size: Optional[int] = None) -> "Layout":
        """The layout the parsed flags ask for; ``world_size`` default: the launcher's."""
        if world_size is None:
            world_size = launched_world_size()
        sizes = getattr(args, "hierarchical_context_parallel_sizes", None)
        return cls(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                   args.context_parallel_size, world_size,
                   # Megatron-LM does the same: sequence parallelism needs TP > 1.
                   sequence_parallel=bool(getattr(args, "sequence_parallel", False)
                                          and args.tensor_model_parallel_size > 1),
                   cp_comm_type=getattr(args, "cp_comm_type", None),
                   hierarchical_context_parallel_sizes=tuple(sizes) if sizes else None)

    @property
    def dp(self) -> int:
        if self.world_size is None:
            return 1
        return self.world_size // (self.tp * self.pp * self.cp)

    def check_model(self, *, heads: int, groups: int, ffn: Optional[int], layers: int,
                    names: Mapping[str, str] = FLAG_NAMES) -> None:
        """Megatron's divisibility rules for this model under this layout."""
        if heads % groups:
            raise self.error(f"{names['heads']} ({heads}) must be divisible by "
                             f"{names['groups']} ({groups})")
        rules = [("heads", heads, self.tp, TP_FLAG,
                  "choose a TP size that divides the head count"),
                 ("groups", groups, self.tp, TP_FLAG,
                  "choose a TP size that divides the KV group count"),
                 ("ffn", ffn, self.tp, TP_FLAG, None),
                 ("layers", layers, self.pp, PP_FLAG, None)]
        for name, value, size, flag, hint in rules:
            if value is not None and value % size:
                raise self.error(f"{names[name]} ({value}) must be divisible by {flag} ({size}); "
                                 + (hint or f"choose a divisor of {value}"))

    def check_sequence(self, seq_len: int, flag: str = "--seq-length") -> None:
        """The load-balanced CP layout cuts a sequence into 2 x CP equal chunks."""
        if self.cp > 1 and seq_len % (2 * self.cp):
            raise self.error(
                f"{flag} ({seq_len}) must be divisible by 2 x {CP_FLAG} (= {2 * self.cp}) for "
                f"the load-balanced context-parallel layout; pad or pick another length")


def launched_world_size() -> int:
    """How many ranks the launcher (torchrun, srun, or none) started; ``launch.py`` decides."""
    return launch.world_size()
