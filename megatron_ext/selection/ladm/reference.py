"""Naive LADM reference: CDS read off full eager attention matrices.

For tests and benchmarks only: it materialises every layer's [heads, L, L] probabilities, which
is exactly what the blockwise scorer avoids. The loops follow the released scorer's loops and the
paper's sums directly (as described in ``scoring.py``'s docstring) and share nothing with
``scoring.py`` but the settings, so agreement between the two checks the span plan as well as the
blockwise arithmetic.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from megatron_ext.selection.ladm.scoring import CdsSettings, _decoder, attention_implementation


def code_variant_cds(probs: torch.Tensor, settings: CdsSettings) -> float:
    """Released-code CDS of one layer from its causal attention probabilities [H, L, L]."""
    length = probs.shape[-1]
    c = settings.span
    interval, stride, sink = c * settings.d_afs, c * settings.d_cds, c * settings.sink_spans
    afs = []
    t = length - c
    while t > sink + 4 * interval:
        rows = probs[:, t:t + c, :t].double()
        rows = rows / rows.sum(dim=-1, keepdim=True)  # renormalise over keys strictly before t
        column_mass = rows.sum(dim=1).mean(dim=0)
        pfs, weights, k = [], [], 1
        while t - k * interval >= sink:
            start = t - k * interval
            pfs.append(column_mass[start:start + c].sum())
            weights.append(k * interval / length)
            k += 1
        pfs = torch.stack(pfs)
        weights = torch.tensor(weights, dtype=torch.float64)
        position = t / length
        if not settings.length_weight:  # the no_len_weight ablation
            weights, position = torch.ones_like(weights), 1.0
        spread = pfs.std(unbiased=True) if settings.std_weight else 1.0  # no_std ablation
        afs.append(float((pfs * weights).sum() * spread * position))
        t -= stride
    if not afs:
        raise ValueError(f"a {length}-token document is too short for span {c}")
    return sum(afs) / len(afs)


def paper_variant_cds(probs: torch.Tensor, settings: CdsSettings) -> float:
    """Paper CDS of one layer from its causal attention probabilities [H, L, L]."""
    c = settings.span
    n_spans = probs.shape[-1] // c
    m, n = settings.sink_spans, settings.local_spans
    cds = 0.0
    for j in range(settings.first_span, n_spans, settings.d_cds):
        # the model's own attention of span j over spans 0..j (rows already sum to one)
        column_mass = probs[:, j * c:(j + 1) * c, :(j + 1) * c].double().sum(dim=1).mean(dim=0)
        key_spans = list(range(j - n - 1, m - 1, -settings.d_afs))
        if len(key_spans) < 2:
            continue
        pfs = torch.stack([column_mass[i * c:(i + 1) * c].sum() for i in key_spans])
        distance = torch.tensor([(j - i) / n_spans for i in key_spans], dtype=torch.float64)
        position = j / n_spans
        if not settings.length_weight:  # the no_len_weight ablation
            distance, position = torch.ones_like(distance), 1.0
        spread = pfs.std(unbiased=True) if settings.std_weight else 1.0  # no_std ablation
        cds += position * float(spread * (distance * pfs).sum())
    return cds


def _layer_cds(probs: torch.Tensor, settings_list: Sequence[CdsSettings]) -> List[float]:
    formula = {"code": code_variant_cds, "paper": paper_variant_cds}
    return [formula[s.variant](probs, s) for s in settings_list]


@torch.no_grad()
def reference_layer_scores(model, input_ids: Sequence[int], settings_list: Sequence[CdsSettings],
                           keep_all_layers: bool = True) -> List[List[float]]:
    """Per-layer CDS of one document for each settings in ``settings_list``.

    ``keep_all_layers=True`` is the plain Hugging Face route, ``output_attentions=True`` (every
    layer's matrix alive at once); ``False`` reads each layer's eager matrix from a forward hook
    and drops it before the next layer, so only one layer's [H, L, L] is alive at a time.
    """
    decoder = _decoder(model)
    ids = torch.as_tensor([list(input_ids)], dtype=torch.long,
                          device=next(decoder.parameters()).device)
    per_layer: List[List[float]] = []
    with attention_implementation(decoder, "eager"):
        if keep_all_layers:
            attentions = decoder(input_ids=ids, use_cache=False, output_attentions=True).attentions
            per_layer = [_layer_cds(a[0], settings_list) for a in attentions]
        else:
            def hook(module, args, output):
                per_layer.append(_layer_cds(output[1][0], settings_list))
                return (output[0], None)

            handles = [layer.self_attn.register_forward_hook(hook) for layer in decoder.layers]
            try:
                decoder(input_ids=ids, use_cache=False)
            finally:
                for handle in handles:
                    handle.remove()
    return [[layer[i] for layer in per_layer] for i in range(len(settings_list))]
