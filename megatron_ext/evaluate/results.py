"""What an evaluation leaves behind: DIR/results.json, PNG charts and a one-screen summary.

results.json = {"tasks": {TASK: {LENGTH: {"loss" | "accuracy": x, ...}}}, "config": {...}, ...}
with every number (per bucket, per depth, per sample) and the configuration that produced them.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List

from megatron_ext import plots
from megatron_ext.evaluate.tasks import PPL_TASK


def write_json(path: str, results: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)  # a reader never sees half a file


def write_plots(output_dir: str, results: dict) -> List[str]:
    """One PNG per task: a line plot for ppl-by-position, a length x depth heat map otherwise."""
    paths = []
    for task, by_length in results["tasks"].items():
        path = os.path.join(output_dir, f"{task.replace('-', '_')}.png")
        if task == PPL_TASK:
            series = {f"length {length}": [((b["start"] + b["end"]) / 2, b["loss"])
                                           for b in numbers["buckets"]]
                      for length, numbers in by_length.items() if numbers["loss"] is not None}
            plots.line_plot(path, "ppl-by-position: mean next-token loss per position bucket",
                            series, "position of the predicted token (bucket centre)", "loss")
        else:
            lengths = list(by_length)
            depths = list(next(iter(by_length.values()))["by_depth"])
            grid = [[by_length[n]["by_depth"][d]["accuracy"] for d in depths] for n in lengths]
            plots.heatmap(path, f"{task}: exact-match accuracy of greedy answers", lengths,
                          depths, grid)
        paths.append(path)
    return paths


def save(output_dir: str, results: dict) -> Dict[str, object]:
    """results.json and the charts; returns their paths (also recorded in results.json)."""
    os.makedirs(output_dir, exist_ok=True)
    charts = write_plots(output_dir, results)
    results["plots"] = [os.path.basename(p) for p in charts]
    json_path = os.path.join(output_dir, "results.json")
    write_json(json_path, results)
    return {"results": json_path, "plots": charts}


def summary(results: dict, paths: Dict[str, object]) -> str:
    config = results.get("config", {})
    layout = config.get("layout", {})
    lines = ["=" * 78,
             f"long-context evaluation of {config.get('load')} | "
             + " ".join(f"{k.upper()}={v}" for k, v in layout.items())
             + f" | seed {config.get('seed')} | {config.get('seconds', 0):.0f}s"]
    for task, by_length in results["tasks"].items():
        if task == PPL_TASK:
            cells = "  ".join(
                f"{n}: {r['loss']:.4f} (ppl {r['ppl']:.2f}, {r['documents']} docs"
                + (f", {r['skipped_short']} short skipped" if r["skipped_short"] else "") + ")"
                if r["loss"] is not None else f"{n}: no document that long ({r['skipped_short']} skipped)"
                for n, r in by_length.items())
            lines.append(f"{task} loss  {cells}")
            longest = [r for r in by_length.values() if r["loss"] is not None][-1:]
            for r in longest:
                lines.append("  by position: " + " | ".join(
                    f"{b['start']}-{b['end']} {b['loss']:.3f}" for b in r["buckets"]))
        else:
            cells = "  ".join(f"{n}: {r['accuracy']:.2f} ({r['correct']}/{r['samples']})"
                              for n, r in by_length.items())
            lines.append(f"{task} exact match  {cells}")
            depths = list(next(iter(by_length.values()))["by_depth"])
            lines.append("  depth      " + "".join(f"{d:>7}" for d in depths))
            for n, r in by_length.items():
                lines.append(f"  {n:<10} " + "".join(f"{r['by_depth'][d]['accuracy']:7.2f}"
                                                      for d in depths))
    lines.append(f"results: {paths['results']}")
    if paths.get("plots"):
        lines.append("plots: " + ", ".join(paths["plots"]))
    lines.append("=" * 78)
    return "\n".join(lines)
