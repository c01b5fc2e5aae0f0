"""Checkpoint conversion speed and memory against the I/O floor, in one run.

    python benchmarks/convert_speed.py [--synthetic-gb 1.0] [--work DIR] [--repeats 2]

For SmolLM2-135M (bf16, 269 MB) and a synthetic ~1 GB bf16 Llama, each step runs in a fresh
process and reports wall seconds of the work itself (interpreter start and imports excluded) and
peak RSS:

  floor   read every safetensors tensor (safe_open) and write them back with torch.save + fsync
  import  tools/convert_checkpoint.py hf-to-megatron   (writes torch_dist, fsync'd by DCP;
          without the tokenizer-size check, which loads the tokenizer)
  export  tools/convert_checkpoint.py megatron-to-hf   (writes safetensors, fsync'd)

ratio = slowest of import/export over the floor (goal <= 1.5). Memory goal: the conversion's peak
RSS above the process's RSS after imports <= 1.2 x (largest safetensors file + the model's largest
tensor group). Prints a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from benchmarks import cpu_description  # noqa: E402

TIME_GOAL, RSS_FACTOR = 1.5, 1.2


def _status_bytes(field: str) -> int:
    """VmRSS / VmHWM of this process. (ru_maxrss would not do: Linux carries it over exec from
    the parent, so a child started by a big driver reports the driver's peak.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


# ------------------------------------------------------------------------------------------
# Steps (child processes)
# ------------------------------------------------------------------------------------------

def step_floor(hf_dir: str, out_dir: str) -> None:
    import torch
    from safetensors import safe_open

    tensors = {}
    for name in sorted(os.listdir(hf_dir)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(hf_dir, name), framework="pt") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys()})
    path = os.path.join(out_dir, "floor.pt")
    with open(path, "wb") as f:
        torch.save(tensors, f)
        f.flush()
        os.fsync(f.fileno())


def run_step(step: str, hf_dir: str, out_dir: str, reference: str) -> dict:
    # Imports are not part of the measurement (transformers writes the exported config.json).
    import torch  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401
    from megatron.core.dist_checkpointing.strategies import torch as _  # noqa: F401
    from transformers import AutoConfig, LlamaConfig, MistralConfig, Qwen2Config  # noqa: F401

    import megatron_ext.model  # noqa: F401
    from megatron_ext.checkpoints import convert
    from megatron_ext.checkpoints.convert import export_hf, import_hf  # noqa: F401

    base = _status_bytes("VmRSS")
    start = time.perf_counter()
    if step == "floor":
        step_floor(hf_dir, out_dir)
    elif step == "import":
        # The tokenizer-size check (loads the tokenizer, ~1 s) is not weight conversion.
        convert.hf_to_megatron(hf_dir, out_dir, progress=False, check_tokenizer=False)
    else:
        convert.megatron_to_hf(reference, out_dir, reference_hf_dir=hf_dir, progress=False)
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    return {"seconds": seconds, "peak_rss": peak, "base_rss": base, "delta_rss": peak - base}


# ------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------

def make_synthetic_llama(out_dir: str, gigabytes: float) -> str:
    """A random bf16 Llama (GQA, untied) of about ``gigabytes``, written shard-streamed."""
    import torch
    from transformers import LlamaConfig

    from megatron_ext.checkpoints.convert import engine, read_hf_config
    from megatron_ext.checkpoints.convert.hf_io import SafetensorsShardWriter

    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    hidden, ffn, heads, groups, vocab = 2048, 5632, 16, 4, 32000
    layer_bytes = 2 * (2 * hidden * hidden + 2 * hidden * hidden // 4 + 3 * hidden * ffn)  # bf16
    layers = max(1, round((gigabytes * 1e9 - 2 * 2 * vocab * hidden) / layer_bytes))
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=groups, max_position_embeddings=8192, dtype="bfloat16")
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    config.save_pretrained(tmp)
    spec = read_hf_config(tmp)
    shapes = engine.hf_shapes(spec, engine.megatron_shapes(spec, vocab))
    writer = SafetensorsShardWriter(tmp, [(n, s, torch.bfloat16) for n, s in shapes.items()],
                                    max_shard_bytes=5 * 10**9)
    gen = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        if len(shape) == 1:
            writer.write(name, torch.ones(shape, dtype=torch.bfloat16))
        else:
            writer.write(name, (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16))
    writer.close()
    os.replace(tmp, out_dir)
    return out_dir


def model_sizes(hf_dir: str) -> dict:
    from megatron_ext.checkpoints.convert import engine, read_hf_config
    from megatron_ext.checkpoints.convert.hf_io import HFCheckpointReader

    spec = read_hf_config(hf_dir)
    reader = HFCheckpointReader(hf_dir)
    shapes = reader.shapes()
    itemsize = {"F32": 4, "BF16": 2, "F16": 2}
    nbytes = {n: itemsize[reader.dtype_name(n)] * int(torch_numel(s)) for n, s in shapes.items()}
    largest_group = max(sum(nbytes[n] for n in m.hf) for m in engine.mappings(spec))
    return {"largest_file": max(reader.file_sizes()), "largest_group": largest_group,
            "total": sum(nbytes.values())}


def torch_numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------

def measure(step: str, hf_dir: str, out_dir: str, reference: str) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", step, "--hf-dir", hf_dir,
                           "--out", out_dir, "--reference", reference],
                          env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{step} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_model(label: str, hf_dir: str, work: str, repeats: int) -> dict:
    sizes = model_sizes(hf_dir)
    mg, floor_dir, out = (os.path.join(work, f"{label}-{d}") for d in ("megatron", "floor", "hf"))
    results = {}
    for step, out_dir in (("floor", floor_dir), ("import", mg), ("export", out)):
        runs = [measure(step, hf_dir, out_dir, mg) for _ in range(repeats)]
        best = min(runs, key=lambda r: r["seconds"])
        results[step] = {"seconds": round(best["seconds"], 3),
                         "peak_rss_mb": round(max(r["peak_rss"] for r in runs) / 1e6, 1),
                         "delta_rss_mb": round(max(r["delta_rss"] for r in runs) / 1e6, 1)}
    shutil.rmtree(floor_dir, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(mg, ignore_errors=True)
    budget = RSS_FACTOR * (sizes["largest_file"] + sizes["largest_group"]) / 1e6
    floor_s = results["floor"]["seconds"]
    return {
        "model": label, "total_mb": round(sizes["total"] / 1e6, 1),
        "largest_file_mb": round(sizes["largest_file"] / 1e6, 1),
        "largest_group_mb": round(sizes["largest_group"] / 1e6, 1),
        **{f"{k}_{m}": v[m] for k, v in results.items() for m in v},
        "import_ratio": round(results["import"]["seconds"] / floor_s, 3),
        "export_ratio": round(results["export"]["seconds"] / floor_s, 3),
        "rss_budget_mb": round(budget, 1),
        "rss_ok": max(results["import"]["delta_rss_mb"],
                      results["export"]["delta_rss_mb"]) <= budget,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--synthetic-gb", type=float, default=1.0, help="0 skips the synthetic model")
    p.add_argument("--repeats", type=int, default=2, help="fresh-process runs per step; best time")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--hf-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--reference", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_step(args.child, args.hf_dir, args.out, args.reference)))
        return 0

    work = args.work or tempfile.mkdtemp(prefix="convert_speed_")
    os.makedirs(work, exist_ok=True)
    models = []
    try:
        from dev import assets

        models.append(("smollm2-135m", str(assets.smollm2_hf_dir())))
    except Exception as err:  # noqa: BLE001 - the asset is optional for the benchmark
        print(f"skipping SmolLM2: {err}", file=sys.stderr)
    if args.synthetic_gb > 0:
        label = f"synthetic-llama-{args.synthetic_gb:g}gb"
        models.append((label, make_synthetic_llama(os.path.join(work, label), args.synthetic_gb)))

    rows = [bench_model(label, hf_dir, work, args.repeats) for label, hf_dir in models]
    cols = ["model", "total_mb", "floor_seconds", "import_seconds", "export_seconds",
            "import_ratio", "export_ratio", "import_delta_rss_mb", "export_delta_rss_mb",
            "rss_budget_mb", "rss_ok"]
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(str(row[c]) for c in cols))
    ratio = max(max(r["import_ratio"], r["export_ratio"]) for r in rows)
    print(json.dumps({"benchmark": "convert_speed", "ratio": ratio, "goal": TIME_GOAL,
                      "rss_ok": all(r["rss_ok"] for r in rows), "device": cpu_description(),
                      "models": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
