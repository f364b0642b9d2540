"""`dsv3-run eval`: perplexity and MTP agreement agree with a direct computation from llm.logits."""
import math

import pytest
import torch

from dsv3.commands.eval import default_data, document_segments, eval_segments, read_documents, score
from dsv3.commands.main import main


@pytest.fixture(scope="module")
def llm():
    from dsv3 import LLM
    return LLM()


@pytest.fixture(scope="module")
def segments(llm):
    return eval_segments(llm._tokenizer(), read_documents(default_data())[:2], seq_len=48, max_tokens=150)


def test_document_segments_cover_the_document_with_bos():
    ids = list(range(10, 110))
    segs = document_segments(ids, seq_len=16, bos=0, eos=1)
    assert all(s[0] == 0 and len(s) <= 16 for s in segs)
    assert [t for s in segs for t in s[1:]] == ids + [1]
    assert len(segs) == 7 and {len(s) for s in segs[:-1]} == {16} and len(segs[-1]) == 12  # 101 = 6 * 15 + 11


def test_slice_respects_max_tokens(segments):
    assert sum(map(len, segments)) == 150 and all(len(s) <= 48 for s in segments)


def test_perplexity_and_mtp_agreement_match_direct_computation(llm, segments):
    s = score(llm, segments, batch_size=2)
    nll, n, agree, pos = 0.0, 0, 0, 0
    for seg in segments:
        logits = llm.logits([seg])[0]
        lp = torch.log_softmax(logits[:-1], -1)
        nll -= lp[torch.arange(len(seg) - 1), torch.tensor(seg[1:])].sum().item()
        n += len(seg) - 1
        mtp = llm.mtp_logits([seg])[0]
        agree += int((mtp[:-1].argmax(-1) == logits[1:-1].argmax(-1)).sum())
        pos += len(seg) - 2
    assert s.tokens == n and s.mtp_positions == pos and s.mtp_agree == agree
    assert s.perplexity == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert 1 < s.perplexity < 100      # the trained model, far below the vocabulary's 4096


def test_cli_writes_the_fidelity_table(tmp_path, capsys):
    out = tmp_path / "eval.md"
    assert main(["eval", "--formats", "dense,fp8-block", "--max-tokens", "120", "--seq-len", "64",
                 "--spec-prompts", "1", "--spec-new-tokens", "4", "--output", str(out)]) == 0
    table = out.read_text()
    assert "| dense |" in table and "| fp8-block |" in table and "speculative decoding" in table
    assert table in capsys.readouterr().out


def test_cli_rejects_unknown_format(capsys):
    assert main(["eval", "--formats", "fp4"]) == 2
    assert "unknown fp4" in capsys.readouterr().err
