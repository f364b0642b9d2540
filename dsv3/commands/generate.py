"""The default command: complete prompts, a file of prompts, or chat interactively."""
from __future__ import annotations

import json
import sys

from dsv3.commands.options import add_runtime_args, build_llm
from dsv3.core.errors import Dsv3Error, RequestError


def configure(p):
    add_runtime_args(p)
    g = p.add_argument_group("what to generate")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="complete this text")
    src.add_argument("--input-file", metavar="F",
                     help="one prompt per line; prints one completion per line, in order, newlines in it written "
                          "as \\n (and \\ as \\\\). A .jsonl file holds one {\"prompt\": ...} object per line and "
                          "gets JSONL back")
    src.add_argument("--interactive", action="store_true", help="chat with the model (chat template); /clear, /exit")
    g.add_argument("--output-format", choices=("text", "jsonl"),
                   help="--input-file output: text lines, or JSONL objects with the prompt, completion, "
                        "finish_reason and token counts (default: jsonl for a .jsonl input, else text)")
    g.add_argument("--max-new-tokens", type=int, default=64,
                   help="tokens to generate at most (default 64); prompt + this must fit the model's context "
                        "and the latent cache")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = no limit")
    g.add_argument("--seed", type=int, help="sampling seed (per prompt: seed + index)")
    g.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    g.add_argument("--verbose", action="store_true", help="print speed and speculative-decoding metrics (stderr)")
    p.set_defaults(func=run)


def _params(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed, stop=args.stop)


def _check_params(args) -> None:
    """Bad sampling flags fail before the model loads (the same checks the engine makes)."""
    from dsv3.core.sampling import SamplingParams
    try:
        SamplingParams(**{**_params(args), "stop": tuple(args.stop)})
    except RequestError as e:
        key, _, rest = str(e).partition(" ")
        raise RequestError(f"--{key.replace('_', '-')} {rest}") from None


def check_fits(llm, prompt_tokens: int, max_new_tokens: int, what: str = "the prompt") -> None:
    """Refuse, with the numbers, a request whose output would be cut short by the context or the
    cache (the server's rule: prompt + max tokens <= LLM.max_total_tokens)."""
    limit = llm.max_total_tokens
    if prompt_tokens + max_new_tokens <= limit:
        return
    engine = llm.engine
    if limit == engine.max_context:
        holder = f"the model's context is {limit} tokens (max_position_embeddings)"
        fix = ""
    else:
        reserved = f", less {engine.reserve} reserved for MTP drafts" if engine.reserve else ""
        holder = (f"the latent cache holds {limit} tokens (kv_cache.max_tokens = {llm.profile.kv_cache.max_tokens}, "
                  f"in whole {engine.cache.block_size}-token blocks{reserved})")
        fix = " or raise --max-cache-tokens"
    if prompt_tokens >= limit:
        raise RequestError(f"{what} is {prompt_tokens} tokens, but {holder}; shorten it{fix}")
    raise RequestError(f"{what} is {prompt_tokens} tokens and --max-new-tokens is {max_new_tokens}, but {holder}: "
                       f"the output would stop after {limit - prompt_tokens} tokens; lower --max-new-tokens to at "
                       f"most {limit - prompt_tokens}{fix}")


def run(args) -> int:
    _check_params(args)
    if args.output_format and not args.input_file:
        raise Dsv3Error("--output-format applies to --input-file")
    prompts = _read_prompts(args.input_file) if args.input_file else None
    llm = build_llm(args)
    if args.interactive:
        code = _chat(llm, args)
    elif args.input_file:
        code = _complete_file(llm, args, prompts)
    else:
        prompt = args.prompt if args.prompt is not None else "The Zen of Python:"
        ids = llm._tokenizer().encode(prompt)
        check_fits(llm, len(ids), args.max_new_tokens)      # before anything is printed
        sys.stdout.write(prompt)
        llm.generate_ids([ids], on_output=lambda i, out: _write(out.delta), **_params(args))
        sys.stdout.write("\n")
        code = 0
    if args.verbose:
        _report(llm)
    return code


def _read_prompts(path: str) -> list[tuple[int, dict]]:
    """The prompts of --input-file as (line number, {"prompt": text, ...}): a .jsonl file's objects
    (other keys are kept and written back), or a text file's non-empty lines."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.removesuffix("\r") for line in f.read().split("\n")]
    except OSError as e:
        raise Dsv3Error(f"--input-file {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise Dsv3Error(f"--input-file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not path.endswith(".jsonl"):
        return [(n, {"prompt": line}) for n, line in enumerate(lines, 1) if line.strip()]
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise Dsv3Error(f"--input-file {path} line {n}: not valid JSON ({e.msg}); each line holds one object "
                            f"such as {{\"prompt\": \"def fib(n):\"}}") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise Dsv3Error(f"--input-file {path} line {n}: expected an object with a \"prompt\" string, such as "
                            f"{{\"prompt\": \"def fib(n):\"}}")
        records.append((n, obj))
    return records


def _complete_file(llm, args, records: list[tuple[int, dict]]) -> int:
    jsonl = (args.output_format or ("jsonl" if args.input_file.endswith(".jsonl") else "text")) == "jsonl"
    tok = llm._tokenizer()
    ids = [tok.encode(r["prompt"]) for _, r in records]
    for (n, _), p in zip(records, ids):        # every prompt is checked before any is run
        check_fits(llm, len(p), args.max_new_tokens, f"--input-file {args.input_file} line {n}: the prompt")
    _, texts = llm.generate_ids(ids, **_params(args))
    for (_, r), p, text in zip(records, ids, texts):
        if jsonl:
            out = dict(r)
            out.update(completion=str(text), finish_reason=text.finish_reason, prompt_tokens=len(p),
                       completion_tokens=len(text.token_ids))
            print(json.dumps(out, ensure_ascii=False))
        else:
            print(text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r"))
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
        ids = tok.encode_chat(messages + [{"role": "user", "content": line}])
        try:
            check_fits(llm, len(ids), args.max_new_tokens, "the conversation")
        except RequestError as e:     # this turn only: the history stays as it was
            print(f"error: {e}; /clear starts a new conversation", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        _, texts = llm.generate_ids([ids], on_output=lambda i, out: _write(out.delta), **_params(args))
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": str(texts[0])})
    return 0
