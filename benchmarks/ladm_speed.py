"""LADM scoring speed and memory: blockwise probe vs the naive full-attention reference.

    python benchmarks/ladm_speed.py [--speed-length 4096] [--docs 2] [--repeats 2] [--span 128]
        [--memory-lengths 3072 4096 6144 8192] [--reference-max-length 6144]

Model: SmolLM2-135M (30 layers, 9 query / 3 KV heads, head 64) in fp32 on this machine's device;
documents: the first L tokens of Austen novels (real text, SmolLM2 tokenizer). Settings: the
released variant with the spec defaults (span 128, d_afs = d_cds = 4, one sink span).

speed   In one process, on the same documents, each document run by every method in turn,
        the order rotated each repeat; a method's time is the sum over documents of its best
        time per document (the host is shared: the best run is the least disturbed one):
        ours       ``CdsScorer`` - SDPA forward + a fused probe of the planned query spans
        reference  eager attention, every layer's [heads, L, L] probabilities read off a
                   forward hook and dropped after the layer (``reference_layer_scores(...,
                   keep_all_layers=False)``: the memory-friendliest form of the naive route;
                   ``output_attentions=True`` would hold all 30 layers, 18 GB at L = 4096)
        forward    the bare SDPA forward with no scoring, for the probe's overhead
        ratio = reference seconds / ours seconds (goal >= 3 at L = 4096 on CPU). The two scores
        must agree (largest relative difference over layers is printed).
memory  One fresh process per (method, L): peak resident memory while scoring one document,
        above the resident memory just before it (model loaded, a short warm-up run, the
        high-water mark reset via /proc/self/clear_refs; glibc told to return large blocks to
        the OS at once). Linear growth in L for ours, quadratic for the reference.
Prints a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from benchmarks import cpu_description  # noqa: E402

SPEED_GOAL = 3.0


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def load(length: int, docs: int):
    import torch
    from transformers import AutoModel, AutoTokenizer

    from dev import assets

    model_dir = assets.smollm2_hf_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32,
                                      attn_implementation="sdpa").to(device).eval()
    documents = []
    with open(assets.corpus_jsonl("austen")) as f:
        for line in f:
            ids = tokenizer(json.loads(line)["text"], verbose=False)["input_ids"]
            if len(ids) >= length:
                documents.append(ids[:length])
            if len(documents) == docs:
                break
    if len(documents) < docs:
        raise SystemExit(f"only {len(documents)} Austen novels have {length} tokens")
    return model, documents, device


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def run_method(method: str, model, doc, settings):
    import torch

    from megatron_ext.selection.ladm.reference import reference_layer_scores
    from megatron_ext.selection.ladm.scoring import CdsScorer

    if method == "ours":
        return CdsScorer(model, settings).layer_scores([doc])[0]
    if method == "reference":
        return reference_layer_scores(model, doc, [settings], keep_all_layers=False)[0]
    with torch.no_grad():
        model(input_ids=torch.tensor([doc], device=next(model.parameters()).device),
              use_cache=False)
    return None


def speed(length: int, docs: int, span: int, repeats: int) -> dict:
    from megatron_ext.selection.ladm.scoring import CdsSettings

    model, documents, device = load(length, docs)
    settings = CdsSettings(span=span)
    methods = ["ours", "reference", "forward"]
    for method in methods:  # warm-up
        run_method(method, model, documents[0][:min_len(settings)], settings)
    runs = {m: [[] for _ in documents] for m in methods}
    worst = 0.0
    for repeat in range(repeats):
        order = methods[repeat % 3:] + methods[:repeat % 3]
        for n, doc in enumerate(documents):
            scores = {}
            for method in order:
                _sync(device)
                start = time.perf_counter()
                scores[method] = run_method(method, model, doc, settings)
                _sync(device)
                runs[method][n].append(time.perf_counter() - start)
            worst = max(worst, max(abs(a - b) / abs(b)
                                   for a, b in zip(scores["ours"], scores["reference"])))
    best = {m: sum(min(times) for times in runs[m]) for m in methods}
    tokens = length * len(documents)
    row = {"length": length, "docs": len(documents), "repeats": repeats, "device": str(device),
           "max_rel_diff_vs_reference": worst}
    for method in methods:
        row[f"{method}_seconds"] = round(best[method], 2)
        row[f"{method}_tokens_per_s"] = round(tokens / best[method], 1)
    row["ratio"] = round(best["reference"] / best["ours"], 3)
    row["probe_overhead"] = round(best["ours"] / best["forward"] - 1, 3)
    row["all_runs_seconds"] = {m: [[round(t, 2) for t in times] for times in runs[m]]
                               for m in methods}
    return row


def min_len(settings) -> int:
    from megatron_ext.selection.ladm.scoring import min_scorable_length

    return min_scorable_length(settings)


def memory_child(method: str, length: int, span: int) -> dict:
    from megatron_ext.selection.ladm.scoring import CdsSettings

    model, documents, _ = load(length, 1)
    settings = CdsSettings(span=span)
    run_method(method, model, documents[0][:min_len(settings)], settings)  # warm-up
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_bytes("VmRSS")
    start = time.perf_counter()
    run_method(method, model, documents[0], settings)
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    return {"method": method, "length": length,
            "peak_above_base_mb": round((peak - base) / 2**20, 1),
            "base_mb": round(base / 2**20, 1), "seconds": round(seconds, 2)}


def memory(method: str, length: int, span: int) -> dict:
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "MALLOC_MMAP_THRESHOLD_": "131072",
           "MALLOC_TRIM_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, __file__, "--child", method, "--child-length",
                           str(length), "--span", str(span)], env=env, capture_output=True,
                          text=True, timeout=7200)
    if proc.returncode != 0:
        return {"method": method, "length": length, "error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def device_name() -> str:
    """The GPU that runs the scorer, or this CPU; with the load average (a shared host)."""
    import torch

    name = (f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available()
            else cpu_description())
    try:
        load_avg = os.getloadavg()[0]
    except OSError:
        load_avg = float("nan")
    return f"{name}, load avg {load_avg:.1f}"


def growth(rows, method):
    """Exponent k of memory ~ L^k between the two largest lengths measured."""
    import math

    ok = sorted((r["length"], r["peak_above_base_mb"]) for r in rows
                if r["method"] == method and "error" not in r)
    if len(ok) < 2 or ok[-2][1] <= 0:
        return None
    (l1, m1), (l2, m2) = ok[-2], ok[-1]
    return round(math.log(m2 / m1) / math.log(l2 / l1), 2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--speed-length", type=int, default=4096)
    p.add_argument("--docs", type=int, default=2, help="documents in the speed run")
    p.add_argument("--repeats", type=int, default=2, help="runs per method and document")
    p.add_argument("--span", type=int, default=128)
    p.add_argument("--memory-lengths", type=int, nargs="*", default=[3072, 4096, 6144, 8192],
                   help="each must be long enough for the span (2305 tokens at span 128)")
    p.add_argument("--reference-max-length", type=int, default=6144,
                   help="longest L for the reference's memory run (it is quadratic)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-length", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(memory_child(args.child, args.child_length, args.span)))
        return 0

    print(f"device: {device_name()}", flush=True)
    speed_row = speed(args.speed_length, args.docs, args.span, args.repeats)
    print(json.dumps(speed_row), flush=True)
    mem_rows = []
    for length in args.memory_lengths:
        for method in ("ours", "reference"):
            if method == "reference" and length > args.reference_max_length:
                continue
            mem_rows.append(memory(method, length, args.span))
            print(json.dumps(mem_rows[-1]), flush=True)
    print(f"{'L':>6} {'ours peak MB':>13} {'reference peak MB':>18}")
    for length in args.memory_lengths:
        cells = {r["method"]: r.get("peak_above_base_mb", "error") for r in mem_rows
                 if r["length"] == length}
        ours, ref = (str(cells.get(m, "-")) for m in ("ours", "reference"))
        print(f"{length:>6} {ours:>13} {ref:>18}")
    print(json.dumps({"benchmark": "ladm_speed", "ratio": speed_row["ratio"], "goal": SPEED_GOAL,
                      "length": args.speed_length, "device": device_name(),
                      "memory_growth_exponent": {"ours": growth(mem_rows, "ours"),
                                                 "reference": growth(mem_rows, "reference")},
                      "speed": speed_row, "memory": mem_rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
