"""The engine in its own process (dsv3.serve.engine_process): the same answers as the engine in this
process, a client that leaves aborts its sequence there, a crashed engine turns into 503s and a server
told to exit, and `dsv3-run serve` shuts both processes down on SIGTERM."""
import asyncio
import json
import os
import random
import signal
import time
import urllib.request

import pytest

openai = pytest.importorskip("openai", reason="needs the test extra: pip install -e '.[test]'")
pytest.importorskip("zmq", reason="needs the serve extra: pip install -e '.[serve]'")

from dsv3 import LLM  # noqa: E402
from dsv3.core.tokenizer import Tokenizer  # noqa: E402
from dsv3.serve.app import ServedModel, ServeOptions  # noqa: E402
from dsv3.serve.engine_process import EngineProcess  # noqa: E402
from dsv3.serve.server import ServerThread  # noqa: E402

from helpers import make_checkpoint, random_prompts, tiny_config  # noqa: E402

MODEL = "tiny"
pytestmark = pytest.mark.usefixtures("one_thread")


def build_tiny(path: str):
    """Runs in the engine process (spawned: it imports this module by name)."""
    import torch
    torch.set_num_threads(1)
    return LLM(path, backend="cpu", **{"kv_cache.block_size": 16})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("p") / "tiny", tiny_config(), seed=51, std=0.3)
    return path


def _served(ckpt, **options):
    engine = EngineProcess(build_tiny, (str(ckpt),), warm_up=False)
    info = engine.launch(timeout=120)
    model = ServedModel(ckpt, Tokenizer(ckpt), info["vocab_size"], info["max_context"], info["capacity_tokens"],
                        info["reserve"], info["backend"])
    return ServerThread(None, ServeOptions(MODEL, **options), worker=engine, model=model), engine


def test_engine_process_answers_like_the_engine_in_process(ckpt):
    seed = random.randrange(2**31)
    prompts = random_prompts(512, [5, 13, 30, 8, 21, 9], seed)
    ref = build_tiny(str(ckpt))
    want = [ref.generate_ids([p], max_new_tokens=12, ignore_eos=True)[1][0] for p in prompts]
    chat = [{"role": "user", "content": "hello <｜Assistant｜> world"}]
    server, engine = _served(ckpt)
    with server:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)

        async def one(p):
            stream = await client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0,
                                                     stream=True, extra_body={"ignore_eos": True})
            return "".join([c.choices[0].text async for c in stream])

        async def quitter():
            stream = await client.completions.create(model=MODEL, prompt=[7, 8, 9], max_tokens=400, temperature=0,
                                                     stream=True, extra_body={"ignore_eos": True})
            async for _ in stream:
                break
            await stream.close()

        async def load():
            got = await asyncio.gather(*[one(p) for p in prompts], quitter())
            r = await client.chat.completions.create(model=MODEL, messages=chat, max_tokens=6, temperature=0,
                                                     extra_body={"ignore_eos": True})
            return got[:-1], r

        texts, chat_reply = asyncio.run(load())
        assert texts == want, f"seed={seed}"
        assert chat_reply.usage.prompt_tokens == len(ref.tokenizer.encode_chat(chat))
        with pytest.raises(openai.BadRequestError):          # validated on the HTTP side, counted in the engine
            openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0).completions.create(
                model=MODEL, prompt=[1], max_tokens=2, seed=2**64, temperature=1)
        deadline = time.monotonic() + 30
        while True:
            metrics = urllib.request.urlopen(server.url + "/metrics", timeout=30).read().decode()
            if 'dsv3_requests_total{outcome="aborted"} 1.0' in metrics or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert 'dsv3_requests_total{outcome="aborted"} 1.0' in metrics          # the quitter's sequence
        assert 'dsv3_http_errors_total{status="400"} 1.0' in metrics
        assert 'dsv3_requests_total{outcome="length"} 7.0' in metrics
    assert not engine._proc.is_alive()                       # leaving the block stopped the engine too


def test_a_crashed_engine_becomes_503s_and_the_server_exits(ckpt):
    server, engine = _served(ckpt)
    with server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        stream = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=1000, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))                                   # running in the engine
        os.kill(engine._proc.pid, signal.SIGKILL)
        events = []
        try:
            for chunk in stream:
                events.append(chunk)
        except openai.APIError as e:                         # the in-band error event of a started stream
            events.append(e)
        assert events and isinstance(events[-1], openai.APIError) and "engine process exited" in str(events[-1])
        deadline = time.monotonic() + 20
        while not server.server.should_exit:
            assert time.monotonic() < deadline, "the server was not told to exit"
            time.sleep(0.05)
        assert engine.exit_message and "exit code" in engine.exit_message


def test_serve_command_runs_the_engine_process_and_stops_it_on_sigterm(ckpt):
    import subprocess
    import sys
    import http.client
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dsv3.commands.main", "serve", "--model", str(ckpt), "--backend", "cpu",
                             "--port", "0", "--no-warmup", "--log-level", "warning", "--served-model-name", MODEL],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        seen = []
        while "http://127.0.0.1:" not in (line := proc.stdout.readline()):
            seen.append(line)
            assert line and len(seen) < 20, "".join(seen)
        assert "engine in its own process" in line
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                     body=json.dumps({"prompt": [5, 6], "max_tokens": 3, "temperature": 0}))
        assert conn.getresponse().status == 200
        children = _children(proc.pid)
        assert children, "no engine process"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{c}") and _state(c) != "Z" for c in children):
            assert time.monotonic() < deadline, "the engine process outlived the server"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
