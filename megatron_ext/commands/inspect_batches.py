"""Dump what the training loader feeds the model, one JSON line per sample.

Takes the training flags (the same parser as megatron_ext.train), so what you inspect is what you
train on:

    python tools/inspect_batches.py --data-path data/books_text_document \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model /models/llama3 \
        --seq-length 8192 --max-position-embeddings 32768 --position-scheme longrecipe \
        --num-samples 4 --output batches.jsonl --decode

Each line holds index, tokens, labels, loss_mask, position_ids (and document_ids for packed
documents), the starts of recorded segments and documents inside the sample, the token indices
each context-parallel rank keeps (with --context-parallel-size > 1) and, with --decode, the text.

For preference data (tools/preprocess_preference.py; recognised from --data-path alone) each line
holds the row, and per branch ("chosen", "rejected_1", ...) the input_ids, labels (-100 on the
prompt, aligned with the input ids) and position_ids as separate sequences, plus under "packed"
the one sequence the model sees in the --preference-packing layout.
"""

from megatron_ext import arguments
from megatron_ext.errors import UserError
from megatron_ext.data.batch_records import SPLITS, sample_records, write_records


def main(argv=None) -> int:
    parser = arguments.build_parser(prog="inspect_batches.py")
    g = parser.add_argument_group("inspection")
    g.add_argument("--num-samples", type=int, default=4)
    g.add_argument("--output", required=True, help="JSONL file to write")
    g.add_argument("--inspect-split", choices=SPLITS, default="train")
    g.add_argument("--decode", action="store_true", help="add the detokenized text")
    args = parser.parse_args(argv)
    try:
        # World size: the layout given by the flags, so CP slices can be shown without launching.
        world = (args.tensor_model_parallel_size * args.pipeline_model_parallel_size
                 * args.context_parallel_size)
        cfg = arguments.finalize(args, world_size=world)
        if args.num_samples < 1:
            raise arguments.ArgumentError("--num-samples must be >= 1")
        count = write_records(sample_records(cfg, args.num_samples, args.inspect_split,
                                             args.decode), args.output)
    except UserError as err:
        parser.error(str(err))
    print(f"wrote {count} samples to {args.output}")
    return 0
