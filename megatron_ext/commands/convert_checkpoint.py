"""Convert checkpoints between Hugging Face folders and Megatron-Core (torch_dist) checkpoints.

    python tools/convert_checkpoint.py hf-to-megatron --hf-dir SmolLM2 --megatron-dir ckpt/smol
    python -m megatron_ext.train $(cat ckpt/smol/megatron_args.txt) --load ckpt/smol --finetune ...
    python tools/convert_checkpoint.py megatron-to-hf --megatron-dir run/ckpt --hf-dir out \
        --reference-hf-dir SmolLM2
    torchrun --nproc-per-node 3 tools/convert_checkpoint.py verify --hf-dir SmolLM2 \
        --megatron-dir ckpt/smol --tensor-model-parallel-size 3

Families: Llama (incl. Llama-3.1 / 3.2: llama3 RoPE with any parameters, tied embeddings), Mistral,
Qwen2 / Qwen2.5 (incl. YaRN), Qwen3 dense (q/k norms); RoPE default, linear, llama3 and yarn
(dynamic NTK is refused). Mixture-of-experts and Qwen's sliding-window layers are refused.
"""

import argparse
import json
import sys


from megatron_ext.checkpoints.convert import ConversionError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("hf-to-megatron", help="HF folder -> Megatron torch_dist 'release'")
    imp.add_argument("--hf-dir", required=True)
    imp.add_argument("--megatron-dir", required=True)
    imp.add_argument("--tensor-model-parallel-size", type=int, default=1,
                     help="suggested TP layout (validated and recorded; the checkpoint loads "
                          "under any)")
    imp.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    imp.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default=None,
                     help="default: the source's dtype")
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=128)

    exp = sub.add_parser("megatron-to-hf", help="Megatron checkpoint -> HF folder")
    exp.add_argument("--megatron-dir", required=True)
    exp.add_argument("--hf-dir", required=True)
    exp.add_argument("--reference-hf-dir", default=None,
                     help="HF folder of the original model: config fields and tokenizer files")
    exp.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default=None,
                     help="default: the checkpoint's dtype")
    exp.add_argument("--max-shard-size", default="5GB")

    ver = sub.add_parser("verify", help="compare logits of a HF model and a Megatron checkpoint")
    ver.add_argument("--hf-dir", required=True)
    ver.add_argument("--megatron-dir", required=True)
    ver.add_argument("--tensor-model-parallel-size", type=int, default=1,
                     help="> 1: launch with torchrun --nproc-per-node N")
    ver.add_argument("--num-tokens", type=int, default=512)
    ver.add_argument("--text-file", default=None, help="default: English prose from the Python standard library's module "
                          "documentation (about 3,000 tokens)")
    ver.add_argument("--max-abs-tol", type=float, default=1e-3)
    ver.add_argument("--min-agreement", type=float, default=0.999)
    for parser in (imp, exp):
        parser.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_ext.checkpoints import convert

    try:
        if args.command == "hf-to-megatron":
            summary = convert.hf_to_megatron(
                args.hf_dir, args.megatron_dir, args.tensor_model_parallel_size,
                args.pipeline_model_parallel_size, args.dtype, args.make_vocab_size_divisible_by,
                progress=not args.no_progress)
            for note in summary["notes"]:
                print(f"note: {note}", file=sys.stderr)
            print(f"wrote {summary['checkpoint']} ({summary['architecture']}, {summary['dtype']}, "
                  f"vocab {summary['vocab_size']} -> {summary['padded_vocab_size']})")
            print(f"fine-tune with: python -m megatron_ext.train $(cat {args.megatron_dir}/"
                  f"megatron_args.txt) {' '.join(summary['tokenizer_flags'])} "
                  f"--load {args.megatron_dir} --finetune ...")
        elif args.command == "megatron-to-hf":
            summary = convert.megatron_to_hf(args.megatron_dir, args.hf_dir, args.reference_hf_dir,
                                             args.dtype, args.max_shard_size,
                                             progress=not args.no_progress)
            print(f"wrote {args.hf_dir}: {', '.join(summary['files'])} ({summary['architecture']}, "
                  f"{summary['dtype']}; config from {summary['config_from'] or 'model_args.json'})")
        else:
            text = None
            if args.text_file:
                with open(args.text_file) as f:
                    text = f.read()
            result = convert.verify(args.hf_dir, args.megatron_dir, args.tensor_model_parallel_size,
                                    args.num_tokens, text, args.max_abs_tol, args.min_agreement)
            from megatron_ext import parallel

            if parallel.launch_info().rank == 0:
                print(json.dumps(result), flush=True)
            return 0 if result["ok"] else 3
    except ConversionError as err:
        print(f"convert_checkpoint.py: error: {err}", file=sys.stderr)
        return 2
    return 0
