"""The `axolotl-chainlora` command: export a chain adapter, or run the offline demo."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from transformers.utils import logging as transformers_logging

from . import __version__
from .demo import run_demo
from .export import fold_to_lora, merge_to_full_model
from .log import third_party_notices_hidden


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="axolotl-chainlora", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser(
        "export",
        help="fold a chain adapter into an exact plain PEFT LoRA, or merge it into the full model",
        description="Writes OUT_DIR as a plain PEFT LoRA adapter (A' = T A, same r and alpha) that every "
        "LoRA tool loads; with --merge, writes the base model with the adapter merged in (safetensors).",
    )
    export.add_argument("adapter_dir", help="a saved chain adapter (adapter_config.json + adapter_model.safetensors)")
    export.add_argument("out_dir", help="a new directory to write")
    export.add_argument("--merge", action="store_true", help="write the full merged model instead of a plain LoRA")
    export.add_argument("--base-model", help="the base model directory (required with --merge)")
    demo = commands.add_parser(
        "demo",
        help="offline demo: train LinChain on a tiny local model through `axolotl train`, then merge and fold it",
    )
    demo.add_argument(
        "out_dir", nargs="?", default="demo-output", help="a new directory to write (default: demo-output)"
    )
    return parser


@contextlib.contextmanager
def only_this_commands_output():
    """The command prints its own lines only: no warnings or progress bars of the libraries it drives
    (the demo's `axolotl` runs write theirs to log files)."""
    bars_were_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        with third_party_notices_hidden():
            yield
    finally:
        if bars_were_on:
            transformers_logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "export":
        if args.merge and not args.base_model:
            parser.error("--merge needs --base-model PATH, the model the adapter was trained on")
        if args.base_model and not args.merge:
            parser.error("--base-model is only used with --merge")
    with only_this_commands_output():
        return run_demo_command(args) if args.command == "demo" else run_export_command(args)


def run_export_command(args) -> int:
    try:
        if args.merge:
            out = merge_to_full_model(args.adapter_dir, args.base_model, args.out_dir)
            print(f"wrote the merged model to {out}")
        else:
            out = fold_to_lora(args.adapter_dir, args.out_dir)
            print(f"wrote a plain LoRA adapter to {out}")
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"axolotl-chainlora export: error: {error}", file=sys.stderr)
        return 2
    return 0


def run_demo_command(args) -> int:
    try:
        results = run_demo(args.out_dir)
    except (FileExistsError, RuntimeError) as error:
        print(f"axolotl-chainlora demo: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=2))
    print(
        "wrote the base model, config, adapter (out/), plain LoRA (out/plain_lora) and merged model "
        f"(out/merged) under {args.out_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
