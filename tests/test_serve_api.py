"""`dsv3-run serve` on loopback, driven by the official `openai` client: completions and chat, streamed
and not, stop strings, usage counts, the chat template; errors as OpenAI error objects; a client that
disconnects frees its blocks; SIGTERM drains a running stream and exits 0."""
import http.client
import json
import os
import signal
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip("openai", reason="needs the test extra: pip install -e '.[test]'")
pytest.importorskip("uvicorn", reason="needs the serve extra: pip install -e '.[serve]'")

from dsv3 import LLM  # noqa: E402
from dsv3.serve.app import ServeOptions  # noqa: E402
from dsv3.serve.server import ServerThread  # noqa: E402

from helpers import make_checkpoint, tiny_config  # noqa: E402

KEY = "test-key-123"
MODEL = "tiny-dsv3"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("s") / "tiny", tiny_config(), seed=21, std=0.3)
    return path


@pytest.fixture(scope="module")
def server(ckpt, one_thread):
    llm = LLM(ckpt, backend="cpu", **{"kv_cache.block_size": 16})
    llm.engine.max_waiting = 64
    with ServerThread(llm, ServeOptions(MODEL, api_key=KEY, max_body_bytes=64 * 1024)) as s:
        s.llm = llm
        yield s


@pytest.fixture(scope="module")
def ref(ckpt):
    """The same model outside the server: what each request must produce (greedy)."""
    return LLM(ckpt, backend="cpu", **{"kv_cache.block_size": 16})


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _raw(server, method, path, body=None, headers=None):
    """(status, parsed JSON) for a hand-made request, with the key unless headers say otherwise."""
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    hdrs = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body=body, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data) if data else None


def _wait_idle(llm, timeout=30.0):
    """Bounded wait until the engine holds no request and no block."""
    deadline = time.monotonic() + timeout
    eng = llm.engine
    while eng.running or eng.waiting or llm.cache.allocator.num_used:
        assert time.monotonic() < deadline, "engine still busy: blocks were not freed"
        time.sleep(0.02)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    status, body = _raw(server, "GET", "/health", headers={"Authorization": ""})
    assert status == 200 and body == {"status": "ok"}


def test_completion_equals_offline_generation(server, client, ref):
    prompt = "def add(a, b):"
    want, = ref.generate([prompt], max_new_tokens=12)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == want
    n_prompt = len(ref.tokenizer.encode(prompt))
    forced = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert forced.choices[0].finish_reason == "length"
    assert (forced.usage.prompt_tokens, forced.usage.completion_tokens) == (n_prompt, 12)
    assert forced.usage.total_tokens == n_prompt + 12


def test_streamed_completion_equals_the_whole(client):
    kwargs = dict(model=MODEL, prompt="hello world", max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_applies_the_template(server, client, ref):
    ids = ref.tokenizer.encode_chat(CHAT)
    _, (want,) = ref.generate_ids([ids], max_new_tokens=10, ignore_eos=True)
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 10
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]}]
    r2 = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=1, temperature=0)
    assert r2.usage.prompt_tokens == len(ref.tokenizer.encode_chat([{"role": "user", "content": "hello world"}]))
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_stop_strings(client):
    kwargs = dict(model=MODEL, prompt="Beautiful is", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs).choices[0].text
    assert len(full) > 8
    stop = full[4:7]
    cut = client.completions.create(stop=[stop, "\x00never"], **kwargs)
    assert cut.choices[0].text == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(stop=stop, stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text   # held back, never leaked
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(model=MODEL, prompt="hello", max_tokens=12, temperature=0.9, top_p=0.95, seed=7,
                  extra_body={"ignore_eos": True, "top_k": 50})
    a = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == a


def test_errors_are_openai_error_objects(server, client):
    bad_key = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    cases = [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(n=0), "n"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=5000), "max_tokens"),
        (dict(prompt="x " * 2000), "prompt"),
        (dict(prompt=[1, 2, 99999]), "prompt"),
        (dict(prompt=["a", ""]), "prompt"),
        (dict(presence_penalty=2.5), "presence_penalty"),
    ]
    for override, param in cases:
        kwargs = {"model": MODEL, "prompt": "hello", "max_tokens": 4, **override}
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**kwargs)
        assert e.value.status_code == 400 and e.value.body["param"] == param, (override, e.value.body)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5000)


@pytest.mark.parametrize("body, status, needle", [
    (b'{"prompt": "hi", "max_tokens": ', 400, "not valid JSON"),
    (b'[1, 2]', 400, "JSON object"),
    (b'{"prompt": "hi", "max_tokens": "4"}', 400, "max_tokens"),
    (b'{"prompt": "hi", "stream": 1}', 400, "stream"),
    (b'{"prompt": 5}', 400, "prompt"),
    (b'{"max_tokens": 4}', 400, "prompt"),
    (b'{"prompt": "' + b"a" * 70_000 + b'"}', 413, "limit"),
])
def test_malformed_requests(server, body, status, needle):
    got, err = _raw(server, "POST", "/v1/completions", body)
    assert got == status and needle in err["error"]["message"], err
    assert set(err["error"]) == {"message", "type", "param", "code"}


def test_wrong_routes_and_methods(server):
    assert _raw(server, "GET", "/v1/completions")[0] == 405
    status, err = _raw(server, "POST", "/v1/nothing", b"{}")
    assert status == 404 and "no route" in err["error"]["message"]
    status, err = _raw(server, "POST", "/v1/chat/completions", b'{"messages": [{"role": "bot", "content": "x"}]}')
    assert status == 400 and err["error"]["param"] == "messages"
    status, _ = _raw(server, "GET", "/v1/models", headers={"Authorization": "Bearer " + KEY[:-1]})
    assert status == 401


def test_disconnect_mid_stream_frees_blocks(server):
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"model": MODEL, "prompt": "hello " * 40, "max_tokens": 900, "temperature": 0,
                       "stream": True, "ignore_eos": True})
    conn.request("POST", "/v1/completions", body=body, headers={"Authorization": f"Bearer {KEY}",
                                                                "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")           # generation is under way
    assert server.llm.cache.allocator.num_used > 0
    conn.sock.close()                                     # the client goes away mid-stream
    conn.close()
    _wait_idle(server.llm)
    text = server.worker.metrics.render().decode()
    assert 'dsv3_requests_total{outcome="aborted"}' in text


def test_metrics_endpoint(server, client):
    client.completions.create(model=MODEL, prompt="hello", max_tokens=3, temperature=0)
    status = None
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    status, text = resp.status, resp.read().decode()
    assert status == 200
    for name in ("dsv3_requests_waiting", "dsv3_requests_running", "dsv3_cache_usage_ratio",
                 "dsv3_generation_tokens_per_second", "dsv3_time_to_first_token_seconds_bucket",
                 "dsv3_inter_token_latency_seconds_bucket", "dsv3_generation_tokens_total"):
        assert name in text, name


def test_speculative_server_equals_plain_decoding(ckpt, ref, one_thread):
    """With MTP speculation (k = 2) the served greedy answers are the plain engine's, streamed or not."""
    spec = LLM(ckpt, backend="cpu", **{"kv_cache.block_size": 16, "speculative.method": "mtp",
                                       "speculative.num_draft_tokens": 2})
    prompts = ["def add(a, b):", "hello world " * 5, "B"]
    want = [ref.generate([p], max_new_tokens=20)[0] for p in prompts]
    with ServerThread(spec, ServeOptions(MODEL)) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)
        got = [c.completions.create(model=MODEL, prompt=p, max_tokens=20, temperature=0).choices[0].text
               for p in prompts]
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(
            model=MODEL, prompt=prompts[0], max_tokens=20, temperature=0, stream=True))
    assert got == want and streamed == want[0]
    assert spec.engine.stats.spec.verify_steps > 0 and spec.cache.allocator.num_used == 0


def test_sigterm_drains_running_requests_then_exits(ckpt, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dsv3.commands.main", "serve", "--model", str(ckpt), "--backend", "cpu",
                             "--port", "0", "--log-level", "warning", "--served-model-name", MODEL],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        seen = []                                         # "dsv3 serve: warmed up ...", then "... on http://127.0.0.1:PORT"
        while "http://127.0.0.1:" not in (line := proc.stdout.readline()):
            seen.append(line)
            assert line and len(seen) < 20, "".join(seen)    # the server exited, or never printed its URL
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/v1/completions", headers={"Content-Type": "application/json"}, body=json.dumps(
            {"prompt": "hello", "max_tokens": 300, "temperature": 0, "stream": True, "ignore_eos": True}))
        resp = conn.getresponse()
        assert resp.readline().startswith(b"data: ")       # running
        proc.send_signal(signal.SIGTERM)
        events = [json.loads(x[6:]) for x in resp.read().decode().split("\n\n") if x.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] == "length"   # the stream ran to its end
        assert proc.wait(timeout=60) == 0
        with pytest.raises(OSError):                        # and nothing listens any more
            http.client.HTTPConnection("127.0.0.1", port, timeout=5).request("GET", "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
