"""The MTP layer's embedding and head share the main model's storage when the checkpoint's copies are
equal bit for bit (as in the official checkpoints), and keep their own when they differ."""
import random

import torch

from dsv3 import LLM
from dsv3.core import loader
from dsv3.core.config import ModelConfig
from dsv3.core.layout import Mesh
from dsv3.core.loader import Checkpoint, load_weights, mtp_copies_alike
from dsv3.core.model import DeepseekV3
from dsv3.checkpoints.synthetic import random_weights, to_checkpoint_format, write_checkpoint, write_tokenizer
from dsv3.backends.reference.ops import OPS
from dsv3.core.ops import Ops
from dsv3.parallel.sharding import slicer

from helpers import CORPUS, random_prompts, tiny_config

CONFIG = tiny_config(vocab_size=96)
N = CONFIG["num_hidden_layers"]
EMBED, HEAD = f"model.layers.{N}.embed_tokens.weight", f"model.layers.{N}.shared_head.head.weight"


def _checkpoint(path, seed: int, copies: str = "equal"):
    """copies: "equal" (the MTP embedding and head are the main model's, as officially), "random"
    (drawn on their own), "one-ulp" (equal but for one element's last bit in the head)."""
    weights = random_weights(ModelConfig.from_hf(CONFIG), seed, std=0.3)
    if copies != "random":
        weights[EMBED], weights[HEAD] = weights["model.embed_tokens.weight"].clone(), weights["lm_head.weight"].clone()
    tensors = to_checkpoint_format(weights, "dense", torch.float32)
    if copies == "one-ulp":
        i = random.randrange(tensors[HEAD].numel())
        tensors[HEAD].view(-1).view(torch.int32)[i] ^= 1
    write_checkpoint(path, CONFIG, tensors)
    write_tokenizer(path, CONFIG["vocab_size"], CORPUS)
    return path, tensors


def _shared(model):
    return (model.mtp.embed_tokens.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(),
            model.mtp.shared_head.head.weight.data_ptr() == model.lm_head.weight.data_ptr())


def test_equal_copies_share_one_storage_and_outputs_do_not_change(tmp_path, monkeypatch):
    path, tensors = _checkpoint(tmp_path / "equal", seed=random.randrange(2**31))
    assert mtp_copies_alike(Checkpoint(path), ModelConfig.from_hf(CONFIG))
    spec = {"speculative.method": "mtp", "speculative.num_draft_tokens": 2, "speculative.policy": "always"}
    shared = LLM(path, backend="cpu", **spec)
    assert _shared(shared.model) == (True, True)
    # the oracle: the same checkpoint loaded with each copy in its own storage
    monkeypatch.setattr(loader, "share_mtp_copies", lambda model: [])
    separate = LLM(path, backend="cpu", **spec)
    monkeypatch.undo()
    assert _shared(separate.model) == (False, False)
    assert torch.equal(separate.model.mtp.shared_head.head.weight, tensors[HEAD])
    copies = tensors[EMBED].numel() + tensors[HEAD].numel()
    assert (sum(p.numel() for p in shared.model.parameters())
            == sum(p.numel() for p in separate.model.parameters()) - copies)     # each shared tensor counted once
    prompts = random_prompts(96, [3, 11, 6], random.randrange(2**31))
    a, _ = shared.generate_ids(prompts, max_new_tokens=10, ignore_eos=True)
    b, _ = separate.generate_ids(prompts, max_new_tokens=10, ignore_eos=True)
    assert a == b and shared.engine.stats.spec.proposed == separate.engine.stats.spec.proposed
    assert shared.engine.stats.spec.accepted == separate.engine.stats.spec.accepted
    h = torch.randn(4, CONFIG["hidden_size"])
    assert torch.equal(shared.model.mtp.logits(h), separate.model.mtp.logits(h))


def test_different_copies_keep_their_own_storage(tmp_path):
    for copies in ("random", "one-ulp"):
        path, tensors = _checkpoint(tmp_path / copies, seed=random.randrange(2**31), copies=copies)
        llm = LLM(path, backend="cpu")
        assert _shared(llm.model) == ((False, False) if copies == "random" else (True, False)), copies
        assert torch.equal(llm.model.mtp.shared_head.head.weight, tensors[HEAD])
        assert torch.equal(llm.model.lm_head.weight, tensors["lm_head.weight"])


def test_reloading_a_shared_model_unshares_first(tmp_path):
    """A model whose copies are shared, loaded again from a checkpoint whose copies differ: each
    parameter gets its checkpoint tensor (none overwrites the other through the shared storage)."""
    equal, _ = _checkpoint(tmp_path / "equal", seed=1)
    other, tensors = _checkpoint(tmp_path / "random", seed=2, copies="random")
    llm = LLM(equal, backend="cpu")
    assert _shared(llm.model) == (True, True)
    load_weights(llm.model, Checkpoint(other), progress=False)
    assert _shared(llm.model) == (False, False)
    for name in (EMBED, HEAD, "lm_head.weight", "model.embed_tokens.weight"):
        assert torch.equal(llm.model.get_parameter(name), tensors[name]), name


def test_tensor_parallel_slices_are_shared_per_rank(tmp_path):
    """Each rank of a tp=2 layout compares and shares its own vocabulary rows."""
    path, tensors = _checkpoint(tmp_path / "equal", seed=random.randrange(2**31))
    cfg = ModelConfig.from_hf(CONFIG)
    for rank in (0, 1):
        mesh = Mesh(2, rank, 2, 1)
        model = DeepseekV3(cfg, Ops.from_mapping(OPS, {}), "dense", torch.float32, mesh=mesh)
        load_weights(model, Checkpoint(path), progress=False, slicer=slicer(cfg, mesh))
        assert _shared(model) == (True, True)
        lo, hi = mesh.vocab_range(cfg.vocab_size)
        assert torch.equal(model.mtp.shared_head.head.weight, tensors[HEAD][lo:hi])
