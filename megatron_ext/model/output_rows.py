"""Only some positions reach the output layer: a forward hook on the decoder of the last stage.

At long context the logits of every position are the largest tensor of a step ([s x vocabulary]
per sequence: tens of GB at 64K for a 150K vocabulary), while evaluation (answer tokens) and
preference losses (answer tokens) need only a few positions. ``OutputRows`` trims the decoder's
output [s, b, h] to chosen rows of its flattening [s * b, h] before Megatron's output layer, which
then returns logits [1, n, V / TP] for just those rows. Gradients flow through the selection.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from megatron.core import parallel_state


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


class OutputRows:
    """``with rows.only(model, index):`` runs of ``model`` see only those decoder rows.

    ``index`` [n] indexes the sequence-major flattening of the decoder output (t * b + row). The
    hook is installed once per model on the last pipeline stage and passes outputs through
    unchanged outside ``only``.
    """

    def __init__(self):
        self._rows: Optional[torch.Tensor] = None
        self._hooked = set()

    def _attach(self, model: torch.nn.Module) -> None:
        gpt = unwrap(model)
        if id(gpt) not in self._hooked and parallel_state.is_pipeline_last_stage():
            gpt.decoder.register_forward_hook(self._trim)
            self._hooked.add(id(gpt))

    def _trim(self, module, inputs, output):
        if self._rows is None:
            return output
        return output.reshape(-1, 1, output.shape[-1]).index_select(0, self._rows)

    @contextlib.contextmanager
    def only(self, model: torch.nn.Module, rows: Optional[torch.Tensor]) -> Iterator[None]:
        """``rows`` None: every position (no trimming)."""
        self._attach(model)
        self._rows = rows
        try:
            yield
        finally:
            self._rows = None
