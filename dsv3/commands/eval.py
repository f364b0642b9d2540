"""`dsv3-run eval`: the fidelity table of a checkpoint: held-out perplexity per weight format, and
how often the MTP module's draft would be accepted.

Perplexity: each held-out document is tokenised, EOS appended, and cut into segments of at most
`seq_len` tokens, each starting with BOS (`document_segments`, the rule the demo model was trained
with); perplexity = exp(mean next-token cross-entropy) over every predicted token of the segments.

MTP acceptance, two ways (greedy, one draft token):
- teacher-forced: on held-out text, the share of positions i where the MTP module's top-1 for token
  i+2 (from h_i and token i+1) equals the main model's top-1 at position i+1, i.e. the rate at which
  greedy speculative decoding with k=1 would accept the draft if the text so far were the held-out
  text; also the MTP module's own top-1 accuracy against the real token i+2;
- generated: greedy speculative decoding (k=1) from held-out prompts through the engine, reporting
  its measured acceptance (`engine.stats.spec`).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from dsv3.commands.options import add_runtime_args, build_llm
from dsv3.core.errors import Dsv3Error

FORMATS = ("dense", "fp8-block", "fp8-fnuz", "int8-w8a8")


def document_segments(ids: list[int], seq_len: int, bos: int, eos: int) -> list[list[int]]:
    """ids + [EOS] cut into the fewest pieces of at most seq_len - 1 tokens, all of one size but the
    last (which is shorter), each prefixed with BOS."""
    ids = list(ids) + [eos]
    n = -(-len(ids) // (seq_len - 1))
    size = -(-len(ids) // n)
    return [[bos] + ids[i:i + size] for i in range(0, len(ids), size)]


def default_data() -> Path:
    from dsv3.demo import demo_model_path
    return demo_model_path() / "heldout.jsonl"


def read_documents(path: str | Path) -> list[str]:
    """A .jsonl of {"text": ...} objects (one per line), or any other text file as one document."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as e:
        raise Dsv3Error(f"--data {path}: {e.strerror}") from e
    if path.suffix != ".jsonl":
        return [raw]
    try:
        return [json.loads(line)["text"] for line in raw.splitlines() if line.strip()]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise Dsv3Error(f"--data {path}: each line must be a JSON object with a \"text\" field ({e})") from e


def eval_segments(tokenizer, docs: list[str], seq_len: int, max_tokens: int | None) -> list[list[int]]:
    """Held-out segments; with `max_tokens`, every stride-th segment so that the slice spreads over
    the whole split (files differ a lot: a codec table is far easier than a test module), cut off
    once `max_tokens` tokens are collected."""
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise Dsv3Error("eval needs a tokenizer with BOS and EOS tokens (tokenizer_config.json)")
    segs = [s for text in docs for s in document_segments(tokenizer.encode(text, add_bos=False), seq_len,
                                                          tokenizer.bos_id, tokenizer.eos_id) if len(s) >= 3]
    if max_tokens is None:
        return segs
    stride = max(1, -(-sum(map(len, segs)) // max_tokens))
    out, total = [], 0
    for seg in segs[::stride]:
        if total + len(seg) > max_tokens:
            if max_tokens - total >= 3:
                out.append(seg[: max_tokens - total])
            break
        out.append(seg)
        total += len(seg)
    return out


@dataclass
class Scores:
    tokens: int             # predicted tokens (perplexity's denominator)
    nll: float              # summed negative log-likelihood, nats
    mtp_positions: int      # positions with a main-model next-next prediction and a real token i+2
    mtp_agree: int          # MTP top-1 == main model's top-1 at i+1
    mtp_correct: int        # MTP top-1 == the real token i+2
    seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)


def score(llm, segments: list[list[int]], batch_size: int = 8) -> Scores:
    """Teacher-forced perplexity (and, with an MTP layer, MTP agreement) of `llm` on `segments`."""
    import torch
    t0 = time.perf_counter()
    tokens = agree = correct = positions = 0
    nll = 0.0
    for b in range(0, len(segments), batch_size):
        group = segments[b:b + batch_size]
        logits = llm.logits(group)                                         # [B, T, V]
        mtp = llm.mtp_logits(group) if llm.model.has_mtp else None         # [B, T-1, V]
        for i, ids in enumerate(group):
            n = len(ids)
            target = torch.tensor(ids[1:])
            lp = torch.log_softmax(logits[i, : n - 1], dim=-1)
            nll -= float(lp.gather(1, target[:, None]).sum())
            tokens += n - 1
            if mtp is not None:
                draft = mtp[i, : n - 2].argmax(-1)                         # guesses for tokens 2..n-1
                main_next = logits[i, 1: n - 1].argmax(-1)                  # the main model's, same tokens
                agree += int((draft == main_next).sum())
                correct += int((draft == target[1:]).sum())
                positions += n - 2
    return Scores(tokens, nll, positions, agree, correct, time.perf_counter() - t0)


def speculative_acceptance(args, prompts: list[list[int]], max_new_tokens: int) -> tuple[float, float, int]:
    """Greedy MTP speculative decoding (k=1) from `prompts`: (acceptance, mean accepted length, drafts)."""
    llm = build_llm(_with(args, speculative="mtp", num_draft_tokens=1))
    # greedy whatever generation_config.json recommends (a penalty would make every row decode without drafts)
    llm.generate_ids(prompts, max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.0)
    spec = llm.engine.stats.spec
    return (spec.acceptance[0] if spec.acceptance else 0.0), spec.mean_accepted_length, \
        (spec.proposed[0] if spec.proposed else 0)


def _with(args, **changes):
    import argparse
    return argparse.Namespace(**{**vars(args), **changes})


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="held-out perplexity per weight format, and MTP acceptance",
        description="Scores a checkpoint (default: the embedded demo model) on held-out text in each weight "
                    "format the backend runs, converting at load, and measures how often the MTP module's "
                    "greedy draft is accepted. Prints the fidelity table (markdown).")
    add_runtime_args(p)
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--data", metavar="FILE", help="held-out text: .jsonl of {\"text\": ...} lines, or a text "
                   "file (default: the demo model's held-out split, heldout.jsonl)")
    g.add_argument("--formats", default=",".join(FORMATS),
                   help=f"comma-separated weight formats to score (default: {','.join(FORMATS)})")
    g.add_argument("--seq-len", type=int, default=512, help="segment length in tokens, BOS included (default 512)")
    g.add_argument("--max-tokens", type=int, default=32768,
                   help="score N held-out tokens, segments spread evenly over the split (default 32768; 0 = all)")
    g.add_argument("--spec-prompts", type=int, default=16,
                   help="held-out prompts for speculative decoding (default 16; 0 skips it)")
    g.add_argument("--spec-new-tokens", type=int, default=48, help="tokens generated per prompt (default 48)")
    g.add_argument("--output", metavar="FILE.md", help="also write the table to this file")
    p.set_defaults(func=run)


def run(args) -> int:
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise Dsv3Error(f"--formats: unknown {', '.join(unknown)}; known: {', '.join(FORMATS)}")
    if args.seq_len < 3:
        raise Dsv3Error("--seq-len must be at least 3")
    data = Path(args.data) if args.data else default_data()
    docs = read_documents(data)

    rows, segments, base = [], None, None
    for fmt in formats:
        llm = build_llm(_with(args, weight_format=fmt))
        if fmt not in llm.spec.weight_formats:
            print(f"skipping {fmt}: backend {llm.spec.name} does not run it")
            continue
        if segments is None:
            segments = eval_segments(llm._tokenizer(), docs, args.seq_len, args.max_tokens or None)
            if not segments:
                raise Dsv3Error(f"--data {data}: no segment of at least 3 tokens")
        s = score(llm, segments)
        base = base or s
        rows.append((llm, fmt, s))
        print(f"{fmt:10s} ppl {s.perplexity:8.4f}  ({s.tokens} tokens, {s.seconds:.1f} s)", flush=True)

    spec = None
    if args.spec_prompts and rows and rows[0][0].model.has_mtp:
        prompts = [seg[:64] for seg in segments[: args.spec_prompts]]
        spec = speculative_acceptance(_with(args, weight_format=rows[0][1]), prompts, args.spec_new_tokens)
    table = format_table(rows, base, spec, args, data)
    print(table)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(table)
    return 0


def format_table(rows, base: Scores, spec, args, data: Path) -> str:
    llm0 = rows[0][0]
    lines = [f"model `{llm0.path.name}`, backend `{llm0.spec.name}`, activations `{llm0.profile.dtype}`; "
             f"data `{data.name}`: {base.tokens} predicted tokens in segments of <= {args.seq_len}", "",
             "| weights | perplexity | vs first row | MTP agrees with main top-1 | MTP top-1 accuracy |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for _, fmt, s in rows:
        rel = (s.perplexity / base.perplexity - 1) * 100
        mtp = (f"{s.mtp_agree / s.mtp_positions:.1%} | {s.mtp_correct / s.mtp_positions:.1%}"
               if s.mtp_positions else "- | -")
        lines.append(f"| {fmt} | {s.perplexity:.4f} | {rel:+.2f}% | {mtp} |")
    if spec is not None:
        rate, mean_len, drafts = spec
        lines += ["", f"Greedy MTP speculative decoding (k=1, weights `{rows[0][1]}`) from {args.spec_prompts} "
                      f"held-out prompts of <= 64 tokens, {args.spec_new_tokens} new tokens each: acceptance "
                      f"{rate:.1%} of {drafts} drafts, mean accepted length {mean_len:.2f} tokens per step."]
    return "\n".join(lines) + "\n"
