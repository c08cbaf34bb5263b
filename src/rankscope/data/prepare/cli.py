"""``rankscope data prepare`` on the command line: its arguments, and a run that prints one line.

The flags mirror the keyword arguments of :func:`~rankscope.data.prepare.prepare`; counts take
the usual forms (``100M``, ``1.5k``, ``4096``). Progress goes to stderr, the summary to stdout.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from ...settings.units import fmt_count, parse_count
from .pipeline import DEFAULT_SHARD_TOKENS, DEFAULT_VAL_TOKENS, prepare_output


def _count_arg(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = parse_count(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``SRC``, ``--tokenizer``, ``--out`` and the options of :func:`prepare` to ``parser``."""
    parser.add_argument(
        "src",
        metavar="SRC",
        help="text/JSONL(.gz)/Parquet/Arrow file, a folder of them (recursive, sorted), a "
        "datasets.save_to_disk folder, or hf://datasets/NAME[/CONFIG][:SPLIT] (needs rankscope[hub])",
    )
    parser.add_argument(
        "--tokenizer",
        required=True,
        metavar="T",
        help="tokenizer.json or a folder holding one; a hub name (online, e.g. HuggingFaceTB/SmolLM-135M); "
        "or train:VOCAB to train a byte-level BPE on SRC (e.g. train:8192)",
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (new, empty, or an earlier prepare to resume)"
    )
    parser.add_argument(
        "--text-field",
        default="text",
        metavar="NAME",
        help="JSONL field / Parquet or Arrow column holding the text (default: text)",
    )
    parser.add_argument(
        "--shard-tokens",
        type=_count_arg(1),
        default=DEFAULT_SHARD_TOKENS,
        metavar="N",
        help="tokens per shard (default: 100M)",
    )
    parser.add_argument(
        "--val-tokens",
        type=_count_arg(0),
        default=DEFAULT_VAL_TOKENS,
        metavar="N",
        help="first N tokens become validation, at most a tenth of all (default: 10M)",
    )
    parser.add_argument(
        "--max-tokens", type=_count_arg(2), default=None, metavar="N", help="stop after N tokens in all"
    )
    parser.add_argument(
        "--workers",
        type=_count_arg(1),
        default=1,
        metavar="N",
        help="tokenizing processes; the output is identical for any N (default: 1)",
    )
    parser.add_argument(
        "--eot-id",
        type=int,
        default=None,
        metavar="ID",
        help="document separator id (default: the tokenizer's <|endoftext|> or eos token)",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar or log lines on stderr"
    )


def run(args: argparse.Namespace) -> int:
    """Run :func:`prepare` from parsed arguments and print a one-line summary on stdout."""
    t0 = time.perf_counter()
    meta, already = prepare_output(
        args.src,
        args.tokenizer,
        args.out,
        text_field=getattr(args, "text_field", "text"),
        shard_tokens=getattr(args, "shard_tokens", DEFAULT_SHARD_TOKENS),
        val_tokens=getattr(args, "val_tokens", DEFAULT_VAL_TOKENS),
        workers=getattr(args, "workers", 1),
        eot_id=getattr(args, "eot_id", None),
        max_tokens=getattr(args, "max_tokens", None),
        progress=getattr(args, "progress", True),
    )
    n_train = sum(1 for s in meta["shards"] if s["split"] == "train")
    n_val = len(meta["shards"]) - n_train
    tokens = meta["tokens"]
    summary = (
        f"{args.out}: {n_train} train + {n_val} val shards, {fmt_count(tokens['train'])} train + "
        f"{fmt_count(tokens['val'])} val tokens, {meta['documents']['total']:,} documents, "
        f"vocab {meta['vocab_size']}, eot {meta['eot_id']}"
    )
    if already:
        summary += " (already complete, nothing to do)"
    else:
        seconds = time.perf_counter() - t0
        summary += f" in {seconds:.1f}s"
    print(f"{summary}; train with --data {args.out} --set model.vocab_size={meta['model_vocab_size']}")
    return 0
