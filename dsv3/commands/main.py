"""`dsv3-run`: generate text (the default), or one of the subcommands listed in COMMANDS.

Each subcommand is a module in dsv3.commands with `register(subparsers)` that adds its parser and
sets `func`; heavy imports happen inside the command, so `dsv3-run --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from dsv3.core.errors import Dsv3Error

COMMANDS = ("backends", "profiles", "check", "convert", "bench", "serve", "eval", "plan")
EPILOG = """subcommands (dsv3-run COMMAND --help for each):
  backends   list backends, their hardware, default profiles and op coverage
  profiles   list the shipped YAML profiles
  check      run a backend's ops against the reference (conformance suite)
  convert    convert a checkpoint between weight formats (bf16, fp8-block, fp8-fnuz, int8-w8a8)
  bench      benchmark ops and end-to-end decode/prefill
  serve      OpenAI-compatible HTTP server
  eval       perplexity and MTP acceptance of a checkpoint
  plan       how many GPUs a checkpoint needs and how memory splits

examples:
  dsv3-run --prompt "def fib(n):"                      # the embedded demo model on the CPU
  dsv3-run --model ~/DeepSeek-V3 --backend cuda --prompt "Hello" --max-new-tokens 64
  dsv3-run --model DIR --interactive                   # chat; /clear forgets, /exit quits
  dsv3-run --model DIR --input-file prompts.txt        # one prompt per line, completions in order
  dsv3-run --model DIR --input-file prompts.jsonl      # {"prompt": ...} per line in, JSONL out
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        parser = argparse.ArgumentParser(prog="dsv3-run")
        sub = parser.add_subparsers(dest="command", required=True)
        importlib.import_module(f"dsv3.commands.{argv[0]}").register(sub)
    else:
        parser = argparse.ArgumentParser(
            prog="dsv3-run", description="Run DeepSeek-V3-family models on any backend.", epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        importlib.import_module("dsv3.commands.generate").configure(parser)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except Dsv3Error as e:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2          # the same status with --debug: it adds the traceback, nothing else
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
