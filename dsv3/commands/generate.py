"""The default command: complete prompts, a file of prompts, or chat interactively."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

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
    g.add_argument("--temperature", type=float, help="0 = greedy (default: the checkpoint's generation_config.json, "
                   "else greedy)")
    g.add_argument("--top-p", type=float, help="default: generation_config.json's, else 1")
    g.add_argument("--top-k", type=int, help="0 = no limit (default: generation_config.json's, else 0)")
    g.add_argument("--seed", type=int, help="sampling seed (per prompt: seed + index; per choice of --n: derived "
                   "from that and the choice's index)")
    g.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    g.add_argument("--stop-token-id", dest="stop_token_ids", type=int, action="append", default=[], metavar="ID",
                   help="stop at this token id, like EOS (repeatable)")
    g.add_argument("--n", type=int, default=1, help="completions per prompt (the prompt is computed once)")
    g.add_argument("--logprobs", type=int, metavar="N", help="print each generated token's logprob and its N most "
                   "likely alternatives (0-20; of the distribution sampled from); stderr for --prompt, a "
                   "\"logprobs\" key in JSONL")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's: minus this from tokens already "
                   "generated ([-2, 2])")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's: minus this times each token's "
                   "count in the output ([-2, 2])")
    g.add_argument("--repetition-penalty", type=float, help="HF's: logits of tokens in the prompt or output divided "
                   "(if > 0) or multiplied by this (1 = none; default: generation_config.json's, else 1)")
    g.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS",
                   help="add BIAS ([-100, 100]) to token ID's logit (repeatable)")
    g.add_argument("--min-tokens", type=int, default=0, help="no EOS or stop token id before this many tokens")
    g.add_argument("--json-schema", metavar="FILE", help="structured output: each completion is JSON valid under "
                   "the JSON schema in FILE (with --prompt and --input-file)")
    g.add_argument("--verbose", action="store_true", help="print speed and speculative-decoding metrics (stderr)")
    p.set_defaults(func=run)


def _params(args) -> dict:
    """generate_ids() keywords; None sampling values take the checkpoint's generation_config.json."""
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed, stop=args.stop, n=args.n, logprobs=args.logprobs,
                presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                repetition_penalty=args.repetition_penalty, logit_bias=_logit_bias(args.logit_bias),
                min_tokens=args.min_tokens, stop_token_ids=args.stop_token_ids,
                json_schema=_json_schema(args.json_schema) if args.json_schema else None)


@functools.lru_cache(maxsize=2)
def _json_schema(path: str) -> dict:
    """The schema in `path`, checked as the engine will compile it (before the model loads)."""
    from dsv3.core import grammar
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RequestError(f"--json-schema {path}: cannot read it ({e})") from None
    try:
        schema = json.loads(text)
        grammar.json_schema(schema)
    except json.JSONDecodeError as e:
        raise RequestError(f"--json-schema {path}: not valid JSON ({e})") from None
    except RequestError as e:
        raise RequestError(f"--json-schema {path}: {e}") from None
    return schema


def _logit_bias(items: list[str]) -> dict[int, float]:
    out = {}
    for item in items:
        token, sep, bias = item.partition("=")
        try:
            out[int(token)] = float(bias)
        except ValueError:
            raise RequestError(f"--logit-bias {item!r}: write TOKEN_ID=BIAS, e.g. --logit-bias 1234=-100") from None
        if not sep:
            raise RequestError(f"--logit-bias {item!r}: write TOKEN_ID=BIAS, e.g. --logit-bias 1234=-100")
    return out


def _check_params(args) -> None:
    """Bad sampling flags fail before the model loads (the same checks the engine makes)."""
    from dsv3.core.sampling import SamplingParams
    if args.n < 1:
        raise RequestError(f"--n {args.n}: must be >= 1")
    given = {k: v for k, v in _params(args).items() if v is not None and k not in ("n", "json_schema")}
    given.update(stop=tuple(args.stop), stop_token_ids=tuple(args.stop_token_ids),
                 logit_bias=tuple(given["logit_bias"].items()))
    try:
        SamplingParams(**given)
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
    if args.interactive and (args.n != 1 or args.logprobs is not None or args.json_schema):
        raise Dsv3Error("--n, --logprobs and --json-schema apply to --prompt and --input-file, not --interactive")
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
        choices = _params(args)["n"]
        if choices == 1:        # streamed as it is generated
            sys.stdout.write(prompt)
            _, texts = llm.generate_ids([ids], on_output=lambda i, out: _write(out.delta), **_params(args))
            sys.stdout.write("\n")
        else:
            _, texts = llm.generate_ids([ids], **_params(args))
            for j, text in enumerate(texts):
                sys.stdout.write(f"--- choice {j}\n{prompt}{text}\n")
        if args.logprobs is not None:
            for j, text in enumerate(texts):
                _print_logprobs(llm, text, f"choice {j}: " if choices > 1 else "")
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
    n = args.n
    for k, text in enumerate(texts):           # prompt k // n, choice k % n
        (_, r), p = records[k // n], ids[k // n]
        if jsonl:
            out = dict(r)
            if n > 1:
                out["choice"] = k % n
            out.update(completion=str(text), finish_reason=text.finish_reason, prompt_tokens=len(p),
                       completion_tokens=len(text.token_ids))
            if args.logprobs is not None:
                out["logprobs"] = _logprob_records(llm, text)
            print(json.dumps(out, ensure_ascii=False))
        else:
            print(text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r"))
    return 0


def _logprob_records(llm, text) -> list[dict]:
    """One {"token", "logprob", "top_logprobs": {token: logprob}} per generated token."""
    tok = llm._tokenizer()
    return [{"token": tok.decode([t]), "logprob": lp, "top_logprobs": {tok.decode([i]): v for i, v in zip(ids, vals)}}
            for t, (lp, ids, vals) in zip(text.token_ids, text.logprobs or [])]


def _print_logprobs(llm, text, label: str) -> None:
    for rec in _logprob_records(llm, text):
        alts = "  ".join(f"{t!r} {v:.4f}" for t, v in rec["top_logprobs"].items())
        print(f"{label}{rec['token']!r}\t{rec['logprob']:.4f}\t{alts}", file=sys.stderr)


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
