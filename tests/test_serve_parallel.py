"""`dsv3-run serve` under torchrun (2 gloo processes, tp 2 x ep 2): rank 0 serves HTTP, rank 1 steps in
lockstep; answers equal one process's, sampled requests agree across ranks (no hang), and SIGTERM to
torchrun drains the running stream and ends both ranks. And with data-parallel attention (--dp 2): requests
spread over both groups, group 1's tokens reach rank 0, answers equal one process's."""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

pytest.importorskip("uvicorn", reason="needs the serve extra: pip install -e '.[serve]'")

from dsv3 import LLM  # noqa: E402

from helpers import make_checkpoint, tiny_config  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port, body, stream=False):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp if stream else (resp.status, json.loads(resp.read()))


def _post_at_once(port, bodies):
    """The bodies posted concurrently, one thread each -> their (status, json) in order."""
    results = [None] * len(bodies)

    def ask(i):
        results[i] = _post(port, bodies[i])
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def _start(path, *layout):
    """`dsv3-run serve` on 2 gloo ranks under torchrun -> (process, port, its output lines so far and to come)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DSV3_DIST_TIMEOUT": "60"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "--no-python", "dsv3-run", "serve", "--model", str(path), "--backend", "cpu", *layout,
           "--port", "0", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                            start_new_session=True)
    lines = []
    for line in proc.stdout:                       # rank 0 prints the URL once it listens
        lines.append(line)
        if "http://127.0.0.1:" in line:
            break
    else:
        proc.wait()
        pytest.fail("the server did not start:\n" + "".join(lines))
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, int(line.split("http://127.0.0.1:")[1].split()[0]), lines


def test_parallel_server_matches_one_process_and_drains(tmp_path):
    path, _ = make_checkpoint(tmp_path / "ckpt", tiny_config(), seed=44, std=0.3)
    prompts = ["def add(a, b):", "hello world", "Beautiful is better"]
    ref = LLM(path, backend="cpu")
    want = [ref.generate_ids([ref.tokenizer.encode(p)], max_new_tokens=10, ignore_eos=True)[1][0] for p in prompts]
    proc, port, lines = _start(path, "--tp", "2", "--ep", "2")
    try:

        results = _post_at_once(port, [{"prompt": p, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
                                       for p in prompts])
        assert [r[1]["choices"][0]["text"] for r in results] == want, "".join(lines)
        # unseeded sampling: rank 0 draws the seed and sends it, so both ranks sample the same token
        status, body = _post(port, {"prompt": "hello", "max_tokens": 6, "temperature": 1.0, "ignore_eos": True})
        assert status == 200 and body["usage"]["completion_tokens"] == 6

        resp = _post(port, {"prompt": "hello", "max_tokens": 200, "temperature": 0, "stream": True,
                            "ignore_eos": True}, stream=True)
        assert resp.readline().startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)               # torchrun passes it on to both ranks
        events = [json.loads(x[6:]) for x in resp.read().decode().split("\n\n") if x.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] == "length", "".join(lines)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_data_parallel_server_routes_requests_to_every_group(tmp_path):
    """--dp 2 (tp 1, ep 2): rank 0 sends each request to the group with the fewest cache blocks assigned;
    group 1's tokens come back to rank 0 after each step. Answers (greedy and seeded) equal one
    process's, both groups get requests, a lone request leaves the other group idle, SIGTERM drains."""
    path, _ = make_checkpoint(tmp_path / "ckpt", tiny_config(), seed=45, std=0.3)
    prompts = ["def add(a, b):", "hello world", "Beautiful is better", "import os", "class A:", "x = 1"]
    ref = LLM(path, backend="cpu")
    want = [ref.generate_ids([ref.tokenizer.encode(p)], max_new_tokens=4 + i, ignore_eos=True)[1][0]
            for i, p in enumerate(prompts)]
    seeded = ref.generate_ids([ref.tokenizer.encode("hello")], max_new_tokens=6, ignore_eos=True, temperature=1.0,
                              seed=1234)[1][0]
    proc, port, lines = _start(path, "--dp", "2")
    try:
        # a lone request first: group 1 has nothing and must still step with group 0
        status, body = _post(port, {"prompt": prompts[0], "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        assert status == 200 and body["choices"][0]["text"] == want[0], "".join(lines)
        results = _post_at_once(port, [{"prompt": p, "max_tokens": 4 + i, "temperature": 0, "ignore_eos": True}
                                       for i, p in enumerate(prompts)])
        assert [r[1]["choices"][0]["text"] for r in results] == want, "".join(lines)
        assert [r[1]["usage"]["completion_tokens"] for r in results] == [4 + i for i in range(len(prompts))]
        status, body = _post(port, {"prompt": "hello", "max_tokens": 6, "temperature": 1.0, "seed": 1234,
                                    "ignore_eos": True})
        assert status == 200 and body["choices"][0]["text"] == seeded
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/metrics")
        metrics = conn.getresponse().read().decode()
        placed = {g: float(line.split()[-1]) for line in metrics.splitlines()
                  for g in ("0", "1") if line.startswith(f'dsv3_data_parallel_requests_total{{group="{g}"}}')}
        assert placed.get("0", 0) >= 2 and placed.get("1", 0) >= 2, placed

        resp = _post(port, {"prompt": "hello", "max_tokens": 200, "temperature": 0, "stream": True,
                            "ignore_eos": True}, stream=True)
        assert resp.readline().startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)
        events = [json.loads(x[6:]) for x in resp.read().decode().split("\n\n") if x.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] == "length", "".join(lines)
        proc.wait(timeout=60)                          # torchrun itself exits 1 on the signal it passed on
        assert "the engine stopped" not in "".join(lines) and "DistributedError" not in "".join(lines), "".join(lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
