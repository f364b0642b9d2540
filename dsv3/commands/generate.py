"""The default command: complete prompts, a file of prompts, or chat interactively."""
from __future__ import annotations

import sys

from dsv3.core.cli import add_runtime_args, build_llm
from dsv3.core.errors import Dsv3Error


def configure(p):
    add_runtime_args(p)
    g = p.add_argument_group("what to generate")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="complete this text")
    src.add_argument("--input-file", metavar="F", help="a file with one prompt per line; completions are printed in order")
    src.add_argument("--interactive", action="store_true", help="chat with the model (chat template); /clear, /exit")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = no limit")
    g.add_argument("--seed", type=int, help="sampling seed (per prompt: seed + index)")
    g.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    g.add_argument("--verbose", action="store_true", help="print speed and speculative-decoding metrics")
    p.set_defaults(func=run)


def _params(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed, stop=args.stop)


def run(args) -> int:
    llm = build_llm(args)
    if args.interactive:
        return _chat(llm, args)
    if args.input_file:
        try:
            with open(args.input_file, encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise Dsv3Error(f"--input-file {args.input_file}: {e.strerror}") from e
        for text in llm.generate(prompts, **_params(args)):
            print(text.replace("\n", "\\n"))
        return 0
    prompt = args.prompt if args.prompt is not None else "The Zen of Python:"
    sys.stdout.write(prompt)
    llm.generate([prompt], on_output=lambda i, out: _write(out.delta), **_params(args))
    sys.stdout.write("\n")
    if args.verbose:
        _report(llm)
    return 0


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _report(llm) -> None:
    stats = llm.engine.stats
    print(f"[{stats.summary()}]", file=sys.stderr)


def _chat(llm, args) -> int:
    tok = llm._tokenizer()
    messages = []
    print("chat with the model; /clear starts over, /exit quits", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if line.strip() == "/exit":
            break
        if line.strip() == "/clear":
            messages = []
            print("(history cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = tok.encode_chat(messages)
        _, texts = llm.generate_ids([ids], on_output=lambda i, out: _write(out.delta), **_params(args))
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": texts[0]})
    return 0
