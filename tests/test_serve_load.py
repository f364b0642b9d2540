"""Load on the server (loopback, bounded in count and time): 64+ concurrent streaming clients over a
cache too small for all of them, with clients that disconnect mid-stream and malformed requests mixed
in. Every completed response equals the same request run alone (greedy), nothing errors, and every
cache block is free at the end. Then a full cache with a bounded queue answers 503."""
import asyncio
import json
import random
import time

import pytest

openai = pytest.importorskip("openai", reason="needs the test extra: pip install -e '.[test]'")
pytest.importorskip("uvicorn", reason="needs the serve extra: pip install -e '.[serve]'")

from dsv3 import LLM  # noqa: E402
from dsv3.serve.app import ServeOptions  # noqa: E402
from dsv3.serve.server import ServerThread  # noqa: E402

from helpers import make_checkpoint, random_prompts, tiny_config  # noqa: E402

MODEL = "tiny"
BS = 16
BOUND_S = 240          # the whole load must finish within this (it takes a few seconds)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("l") / "tiny", tiny_config(), seed=33, std=0.3)
    return path


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def _llm(ckpt, max_tokens, sharing=True):
    llm = LLM(ckpt, backend="cpu", **{"kv_cache.block_size": BS, "kv_cache.max_tokens": max_tokens})
    llm.engine.prefix_caching = sharing
    return llm


def _wait_idle(llm, timeout=30.0):
    deadline = time.monotonic() + timeout
    while llm.engine.running or llm.engine.waiting or llm.cache.allocator.num_used:
        assert time.monotonic() < deadline, "engine still busy: blocks were not freed"
        time.sleep(0.02)


async def _http(url, raw: bytes, until: bytes | None = None):
    """Send raw bytes on a fresh connection; read the whole answer, or up to `until` and hang up."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(raw)
    await writer.drain()
    data = await (reader.read() if until is None else reader.readuntil(until))
    writer.close()
    return data


def _post(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def test_64_concurrent_streams_with_disconnects_and_bad_requests(ckpt):
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    # 48 completions with token-id prompts (4 share a 40-token prefix: prefix caching under load)
    # and 16 chats with one shared system prompt; 12 to 22 output tokens each.
    shared = random_prompts(512, [40], seed)[0]
    prompts = random_prompts(512, [rng.randrange(3, 60) for _ in range(48)], seed + 1)
    prompts = [shared + p[:8] if i % 12 == 0 else p for i, p in enumerate(prompts)]
    system = {"role": "system", "content": "Answer in one short line. " * 6}
    chats = [[system, {"role": "user", "content": f"question {i}: " + "why " * rng.randrange(1, 12)}]
             for i in range(16)]
    lengths = [rng.randrange(12, 23) for _ in range(64)]

    ref = _llm(ckpt, 16384, sharing=False)
    chat_ids = [ref.tokenizer.encode_chat(m) for m in chats]
    want = [ref.generate_ids([ids], max_new_tokens=n, ignore_eos=True)[1][0]
            for ids, n in zip(prompts + chat_ids, lengths)]

    # 40 blocks of 16 = 640 tokens for ~64 x 50: most requests queue, running ones get preempted;
    # 96 tokens per step: prompts are prefilled in chunks beside the running decodes
    llm = _llm(ckpt, 40 * BS)
    llm.engine.max_waiting = 256
    llm.engine.max_batch_tokens = 96
    with ServerThread(llm, ServeOptions(MODEL)) as server:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=BOUND_S)

        async def completion(i):
            stream = await client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=lengths[i],
                                                     temperature=0, stream=True, extra_body={"ignore_eos": True})
            parts, reason = [], None
            async for c in stream:
                parts.append(c.choices[0].text)
                reason = c.choices[0].finish_reason or reason
            return "".join(parts), reason

        async def chat(j):
            stream = await client.chat.completions.create(
                model=MODEL, messages=chats[j], max_tokens=lengths[48 + j], temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            parts, reason, use = [], None, None
            async for c in stream:
                if c.choices:
                    parts.append(c.choices[0].delta.content or "")
                    reason = c.choices[0].finish_reason or reason
                use = c.usage or use
            assert use.prompt_tokens == len(chat_ids[j]) and use.completion_tokens == lengths[48 + j]
            return "".join(parts), reason

        async def quitter(k):
            # a long stream that hangs up once its first token has arrived
            body = json.dumps({"model": MODEL, "prompt": f"hello {k} " * 10, "max_tokens": 500,
                               "temperature": 0, "stream": True, "ignore_eos": True}).encode()
            head = await _http(server.url, _post("/v1/completions", body), until=b"data: {")
            assert head.startswith(b"HTTP/1.1 200")

        bad_bodies = [b'{"prompt": "x", "max_tokens": ', b'{"prompt": "x", "temperature": "hot"}',
                      b'{"prompt": "x", "model": "other"}', b'{"prompt": "x", "n": 3}',
                      b'{"messages": "hello"}', b'{"prompt": [1, 2, 100000]}', b'{"prompt": "x", "top_p": 7}',
                      b'\xff\xfe not json']

        async def bad(k):
            path = "/v1/chat/completions" if k % 2 else "/v1/completions"
            data = await _http(server.url, _post(path, bad_bodies[k % len(bad_bodies)]))
            status = int(data.split(b" ", 2)[1])
            err = json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]
            return status, err

        async def load():
            tasks = [completion(i) for i in range(48)] + [chat(j) for j in range(16)]
            extra = [quitter(k) for k in range(8)] + [bad(k) for k in range(16)]
            order = list(range(len(tasks) + len(extra)))
            rng.shuffle(order)
            everything = tasks + extra
            results = await asyncio.gather(*(everything[i] for i in order))
            by_index = dict(zip(order, results))
            return [by_index[i] for i in range(len(everything))]

        results = asyncio.run(asyncio.wait_for(load(), BOUND_S))
        answers, bads = results[:64], results[64 + 8:]
        for i, (text, reason) in enumerate(answers):
            assert reason == "length", (i, reason)
            assert text == want[i], f"request {i} differs from its solo run (seed={seed})"
        for status, err in bads:
            assert status in (400, 404) and err["message"], err
        _wait_idle(llm)
        assert llm.cache.allocator.num_used == 0
        metrics = server.worker.metrics.render().decode()
        assert 'dsv3_requests_total{outcome="aborted"} 8.0' in metrics     # every quitter was dropped
        stats = llm.engine.stats
        assert stats.prefix_cached_tokens > 0          # shared prefixes were reused under load


def test_full_cache_queues_then_answers_503(ckpt):
    """12 blocks: A (100 + 80 tokens) fills the cache, B waits for it, C finds the queue full (503);
    when A ends, B runs and produces its solo answer."""
    llm = _llm(ckpt, 12 * BS)
    llm.engine.max_waiting = 1
    a_ids, b_ids, c_ids = random_prompts(512, [100, 100, 10], random.randrange(2**31))
    ref = _llm(ckpt, 16384, sharing=False)
    want_a = ref.generate_ids([a_ids], max_new_tokens=80, ignore_eos=True)[1][0]
    want_b = ref.generate_ids([b_ids], max_new_tokens=40, ignore_eos=True)[1][0]
    with ServerThread(llm, ServeOptions(MODEL)) as server:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=BOUND_S)

        async def stream(ids, n, started=None):
            s = await client.completions.create(model=MODEL, prompt=ids, max_tokens=n, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True})
            parts = []
            async for c in s:
                if started is not None and not started.is_set():
                    started.set()
                parts.append(c.choices[0].text)
            return "".join(parts)

        async def scenario():
            a_started = asyncio.Event()
            a = asyncio.create_task(stream(a_ids, 80, a_started))
            await asyncio.wait_for(a_started.wait(), BOUND_S)
            b = asyncio.create_task(stream(b_ids, 40))
            deadline = time.monotonic() + BOUND_S
            while len(llm.engine.waiting) < 1:          # B is queued behind A
                assert time.monotonic() < deadline and not b.done()
                await asyncio.sleep(0.005)
            with pytest.raises(openai.APIStatusError) as e:
                await client.completions.create(model=MODEL, prompt=c_ids, max_tokens=4)
            assert e.value.status_code == 503 and "overloaded" in e.value.message
            assert e.value.response.headers.get("retry-after") == "1"
            return await a, await b

        got_a, got_b = asyncio.run(asyncio.wait_for(scenario(), BOUND_S))
        assert (got_a, got_b) == (want_a, want_b)
        _wait_idle(llm)


def test_abusive_requests_beside_normal_ones(ckpt):
    """The audit's three server killers (a seed past 2**64 with sampling, a 1 MiB stop string, a 3.9 MB
    prompt) sent while 16 normal streams run: every abuser gets its 400, and the normal streams get
    their solo answers in about the time they take alone (before: the seed killed the engine thread
    for good; the stop string stalled every stream for ~90 s; each prompt cost 3 s and 400 MB)."""
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    prompts = random_prompts(512, [rng.randrange(4, 40) for _ in range(16)], seed)
    lengths = [rng.randrange(10, 20) for _ in range(16)]
    ref = _llm(ckpt, 16384, sharing=False)
    want = [ref.generate_ids([ids], max_new_tokens=n, ignore_eos=True)[1][0] for ids, n in zip(prompts, lengths)]
    abusive = [{"prompt": [5, 6, 7], "max_tokens": 8, "temperature": 1, "seed": 2**64 + k} for k in range(4)]
    abusive += [{"prompt": [5, 6], "max_tokens": 8, "stop": "z" * 1048576}] * 2
    abusive += [{"prompt": "word " * 780_000, "max_tokens": 4}] * 2
    bodies = [json.dumps(a).encode() for a in abusive]

    llm = _llm(ckpt, 16384)
    with ServerThread(llm, ServeOptions(MODEL)) as server:
        async def normal(client, i):
            stream = await client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=lengths[i],
                                                     temperature=0, stream=True, extra_body={"ignore_eos": True})
            return "".join([c.choices[0].text async for c in stream])

        async def abuse(k):
            await asyncio.sleep(0.01 * k)
            data = await _http(server.url, _post("/v1/completions", bodies[k]))
            return int(data.split(b" ", 2)[1]), json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]

        async def run(with_abuse: bool):
            t0 = time.monotonic()
            client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                                        timeout=BOUND_S)
            results = await asyncio.gather(*[normal(client, i) for i in range(16)],
                                           *[abuse(k) for k in range(len(bodies)) if with_abuse])
            return results, time.monotonic() - t0

        (alone, t_alone) = asyncio.run(asyncio.wait_for(run(False), BOUND_S))
        (mixed, t_mixed) = asyncio.run(asyncio.wait_for(run(True), BOUND_S))
        assert alone == want, f"seed={seed}"
        assert mixed[:16] == want, f"normal streams changed beside the abusers (seed={seed})"
        for status, err in mixed[16:]:
            assert status == 400 and err["param"] in ("seed", "stop", "prompt"), err
        assert t_mixed < 2 * t_alone + 3.0, (t_alone, t_mixed)
        assert server.worker.alive
        _wait_idle(llm)
