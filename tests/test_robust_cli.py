"""`dsv3-run` and `dsv3.LLM` tried as a new user would (issue #25, items 14-17): bad flags get one
error line and exit 2 (--debug adds the traceback, the same status); output that the context or
the cache would cut short is refused up front with the numbers; the API takes a string."""
import io
import json
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3 import LLM
from dsv3.commands.main import main
from dsv3.core.config import ModelConfig
from dsv3.demo import demo_model_path
from dsv3.parallel.sharding import layout_problems

from helpers import make_checkpoint, tiny_config

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = tiny_config()["max_position_embeddings"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("m") / "tiny", tiny_config(), seed=5, fmt="fp8-block")
    return path


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, backend="cpu")


def _error(capsys, argv, *patterns):
    """argv exits 2 with one `error:` line on stderr naming every pattern, and prints nothing on stdout."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    err = err.strip()
    assert err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) == 1, err
    for p in patterns:
        assert p in err, err
    assert out == "", out
    return err


# -- item 14: tracebacks -------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_cuda_device_without_cuda_is_an_error(ckpt, capsys, device):
    _error(capsys, ["--model", str(ckpt), "--device", device, "--prompt", "x"], f"'{device}'", "no cuda device")


def test_an_unknown_device_is_an_error(ckpt, capsys):
    _error(capsys, ["--model", str(ckpt), "--device", "foo", "--prompt", "x"], "'foo' is not a torch device")


def test_serve_refuses_a_port_out_of_range_before_loading(ckpt, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", str(ckpt), "--no-warmup", "--port", "99999"])
    assert e.value.code == 2
    assert "99999 is not a TCP port" in capsys.readouterr().err


def test_serve_prints_the_openai_base_url(ckpt, capsys, monkeypatch):
    import dsv3.serve.server as server_mod

    class Stub:          # the HTTP server itself is test_serve_api's business
        def run(self, sockets):
            sockets[0].close()
    monkeypatch.setattr(server_mod, "make_server", lambda *a, **k: (Stub(), None))
    monkeypatch.setattr(signal, "signal", lambda *a: None)          # pytest keeps its own handlers
    assert main(["serve", "--model", str(ckpt), "--no-warmup", "--engine-thread", "--port", "0"]) == 0
    assert re.search(r"OpenAI base URL http://127\.0\.0\.1:\d+/v1\b", capsys.readouterr().out)


def test_debug_adds_the_traceback_and_keeps_the_exit_status(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope"), "--prompt", "x", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


# -- item 15: output cut short -------------------------------------------------------------------

def test_max_new_tokens_past_the_context_is_refused_up_front(ckpt, capsys):
    _error(capsys, ["--model", str(ckpt), "--prompt", "hello world", "--max-new-tokens", str(CONTEXT + 10)],
           f"context is {CONTEXT} tokens", "lower --max-new-tokens to at most")


def test_a_long_prompt_with_many_new_tokens_is_refused(ckpt, llm, capsys):
    prompt = "hello world " * 300
    n = len(llm.tokenizer.encode(prompt))
    assert n < CONTEXT < n + 600
    _error(capsys, ["--model", str(ckpt), "--prompt", prompt, "--max-new-tokens", "600"],
           f"the prompt is {n} tokens", f"at most {CONTEXT - n}")


def test_a_small_cache_is_named_with_its_size(ckpt, llm, capsys):
    err = _error(capsys, ["--model", str(ckpt), "--max-cache-tokens", "10", "--prompt", "hi",
                          "--max-new-tokens", "100"],
                 "latent cache holds 64 tokens", "kv_cache.max_tokens = 10", "--max-cache-tokens")
    assert f"at most {64 - len(llm.tokenizer.encode('hi'))} " in err


def test_an_input_file_is_checked_before_anything_runs(ckpt, tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("hi\n\n" + "hello world " * 300 + "\n")
    _error(capsys, ["--model", str(ckpt), "--input-file", str(f), "--max-new-tokens", "600"], "prompts.txt line 3")


def test_the_prompt_is_not_echoed_when_a_flag_is_wrong(ckpt, capsys):
    _error(capsys, ["--model", str(ckpt), "--prompt", "hello", "--temperature", "-1"], "--temperature")
    _error(capsys, ["--model", str(ckpt), "--prompt", "hello " * 2000], "context")


def test_chat_refuses_a_turn_that_does_not_fit_and_goes_on(ckpt, capsys, monkeypatch):
    script = "hi\n" + "hello world " * 60 + "\nhi again\n/exit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert main(["--model", str(ckpt), "--interactive", "--max-cache-tokens", "128", "--max-new-tokens", "8",
                 "--verbose"]) == 0
    out, err = capsys.readouterr()
    assert "error: the conversation is" in err and "/clear" in err
    assert out.count("> ") == 4 and "tokens generated" in err           # --verbose counts with --interactive


def test_what_the_rule_allows_is_never_cut_short(ckpt):
    small = LLM(ckpt, backend="cpu", **{"kv_cache.max_tokens": 10})      # one 64-token block
    ids = small.tokenizer.encode("hi")
    (out,), (text,) = small.generate_ids([ids], max_new_tokens=500, ignore_eos=True)
    assert text.finish_reason == "length" and text.token_ids == out
    assert len(ids) + len(out) >= small.max_total_tokens == 64      # the cache, not max_new_tokens, ended it


# -- item 16: the Python API ---------------------------------------------------------------------

def test_generate_takes_a_string_and_returns_a_string(llm):
    one = llm.generate("def fib(n):", max_new_tokens=3)
    many = llm.generate(["def fib(n):", "hello"], max_new_tokens=3)
    assert isinstance(one, str) and isinstance(many, list) and len(many) == 2 and one == many[0]
    assert one.finish_reason in ("stop", "length") and len(one.token_ids) <= 3
    with pytest.raises(TypeError, match="generate_ids"):
        llm.generate([[3, 4, 5]])
    with pytest.raises(TypeError, match="not bytes"):
        llm.generate(b"def fib(n):")


def test_api_errors_do_not_speak_cli(tmp_path):
    with pytest.raises(Exception) as e:
        LLM(tmp_path / "nope")
    assert "no such directory" in str(e.value) and "--" not in str(e.value)


# -- item 17: smaller things ---------------------------------------------------------------------

def test_verbose_counts_with_an_input_file(ckpt, tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("hello\nworld\n")
    assert main(["--model", str(ckpt), "--input-file", str(f), "--max-new-tokens", "3", "--verbose"]) == 0
    assert "tokens generated" in capsys.readouterr().err


def test_input_file_jsonl_in_and_out(ckpt, tmp_path, capsys):
    f = tmp_path / "prompts.jsonl"
    f.write_text(json.dumps({"id": "a", "line": 9, "prompt": "def add(a, b):"}) + "\n\n"
                 + json.dumps({"prompt": "hello"}) + "\n")
    assert main(["--model", str(ckpt), "--input-file", str(f), "--max-new-tokens", "3"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["def add(a, b):", "hello"]
    assert rows[0]["id"] == "a" and rows[0]["line"] == 9              # the input's own keys come back
    for r in rows:
        assert r["finish_reason"] in ("stop", "length") and r["completion_tokens"] <= 3 and r["prompt_tokens"] > 0
    # a text file with --output-format jsonl gives the same completions, in JSONL
    t = tmp_path / "prompts.txt"
    t.write_text("def add(a, b):\nhello\n")
    assert main(["--model", str(ckpt), "--input-file", str(t), "--max-new-tokens", "3",
                 "--output-format", "jsonl"]) == 0
    assert [json.loads(line)["completion"] for line in capsys.readouterr().out.splitlines()] == \
        [r["completion"] for r in rows]
    f.write_text('{"prompt": "x"}\n{"prompt": 3}\n')
    _error(capsys, ["--model", str(ckpt), "--input-file", str(f)], "prompts.jsonl line 2", '"prompt" string')


def test_input_file_text_output_escapes_newlines_and_backslashes(ckpt, llm, tmp_path, capsys):
    prompts = ["def add(a, b):", "hello"]
    want = llm.generate(prompts, max_new_tokens=8)
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(prompts) + "\n")
    assert main(["--model", str(ckpt), "--input-file", str(f), "--max-new-tokens", "8"]) == 0
    lines = capsys.readouterr().out.split("\n")[:-1]
    unescape = {"\\\\": "\\", "\\n": "\n", "\\r": "\r"}
    assert [re.sub(r"\\[\\nr]", lambda m: unescape[m.group()], line) for line in lines] == want


def test_tp_on_the_fp8_demo_names_what_ep_splits():
    cfg = ModelConfig.from_file(demo_model_path() / "config.json")
    problems = layout_problems(cfg, 2, 2, 1, "fp8-block")
    expert = [p for p in problems if "routed expert" in p]
    assert len(expert) == 1 and "parallel.ep = 1 on 2 ranks splits each routed expert" in expert[0]
    assert "--ep 2" in expert[0]
    assert not any("routed expert" in p for p in layout_problems(cfg, 2, 2, 2, "fp8-block"))


def test_the_readme_test_command_is_ci_and_prints_pytest_summary(tmp_path):
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    command = re.search(r"# 2\..*\n(.*)\n", readme).group(1)
    assert command == ci
    pytest_args = shlex.split(command.split("&&")[-1])
    assert pytest_args[:3] == ["python", "-m", "pytest"]
    (tmp_path / "test_one.py").write_text("def test_one():\n    pass\n")
    r = subprocess.run([sys.executable, "-m", "pytest", *pytest_args[3:], "-c", str(ROOT / "pyproject.toml"),
                        "--rootdir", str(tmp_path), "-p", "no:cacheprovider", str(tmp_path / "test_one.py")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and re.search(r"\b1 passed in ", r.stdout), r.stdout
