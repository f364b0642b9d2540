"""Drive a running `dsv3-run serve` with the standard library only (the device image has no openai
client): a greedy completion (twice), the same streamed, a chat completion, /v1/models and /metrics;
print what came back, and where the served greedy tokens first leave the reference backend's argmax.

    dsv3-run serve --backend cuda --port 8765 &  python benchmarks/serve_smoke.py --url http://127.0.0.1:8765
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request

PROMPT = "def read_file(path):"


def call(url: str, path: str, body: dict | None = None) -> bytes:
    req = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read()


def first_divergence(served: str, model: str | None = None) -> str:
    """Teacher-force the served text through the reference backend on the CPU: the first token that
    is not the reference's argmax, and how far below the argmax it was (a near-tie, or a real error)."""
    from dsv3 import LLM
    llm = LLM(model, backend="cpu")
    prompt = llm.tokenizer.encode(PROMPT)
    out = llm.tokenizer.encode(PROMPT + served)[len(prompt):]
    logits = llm.logits([prompt + out])[0]
    for i, tok in enumerate(out):
        row = logits[len(prompt) - 1 + i]
        best = int(row.argmax())
        if tok != best:
            gap, spread = float(row[best] - row[tok]), float(row.max() - row.min())
            return (f"reference on the CPU: served token {i} {llm.tokenizer.decode([tok])!r} is not its argmax "
                    f"{llm.tokenizer.decode([best])!r}; gap {gap:.4f} = {gap / spread:.2%} of the logit range")
    return f"reference on the CPU: all {len(out)} served tokens are its argmax"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", help="the running server")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--text", help="only check this text, generated from the prompt, against the reference")
    args = p.parse_args()
    if args.text is not None:
        print(first_divergence(args.text))
        return 0
    for _ in range(600):                      # the server warms up before it listens
        try:
            call(args.url, "/health")
            break
        except OSError:
            time.sleep(0.5)
    model = json.loads(call(args.url, "/v1/models"))["data"][0]["id"]
    for attempt in ("first", "second"):       # the second shows the steady state after any first-use work
        t0 = time.perf_counter()
        plain = json.loads(call(args.url, "/v1/completions", {"model": model, "prompt": PROMPT,
                                                              "max_tokens": args.max_tokens, "temperature": 0}))
        took = time.perf_counter() - t0
        text = plain["choices"][0]["text"]
        print(f"{attempt} completion ({took * 1000:.0f} ms, usage {plain['usage']}): {text!r}")
    raw = call(args.url, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": args.max_tokens,
                                             "temperature": 0, "stream": True})
    chunks = [json.loads(line[6:]) for line in raw.decode().splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    streamed = "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))
    print(f"streamed in {len(chunks)} chunks, equal to the plain completion: {streamed == text}")
    chat = json.loads(call(args.url, "/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": "Write a function that adds two numbers."}],
        "max_tokens": 32, "temperature": 0.7, "seed": 1}))
    print(f"chat: {chat['choices'][0]['message']['content']!r} ({chat['usage']})")
    metrics = call(args.url, "/metrics").decode().splitlines()
    print("\n".join(m for m in metrics if m.startswith(("dsv3_time_to_first", "dsv3_requests", "dsv3_cache"))
                    and "_bucket" not in m and "_created" not in m))
    print(first_divergence(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
