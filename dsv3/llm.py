"""The stable Python API: `LLM(model_path, backend=..., dtype=..., profile=...)`.

    from dsv3 import LLM
    llm = LLM("path/to/DeepSeek-V3", backend="cpu", dtype="float32")
    llm.generate("Hello", max_new_tokens=32)             # a Completion: a str, with .finish_reason
    llm.generate(["Hello", "def fib(n):"])               # a list of them, in order
    llm.generate("A person:", json_schema={...})          # structured output: JSON valid under the schema
    llm.chat([{"role": "user", "content": "Weather in Oslo?"}], tools=[...])   # a ChatReply (a message dict)
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Callable

import torch

from dsv3.core import grammar
from dsv3.core.batch import Batch, Chunk
from dsv3.core.cache import LatentCache
from dsv3.core.config import ModelConfig
from dsv3.core.engine import Engine, StepOutput
from dsv3.core.errors import CheckpointError, ProfileError, RequestError
from dsv3.core.loader import Checkpoint, checkpoint_format, has_mtp, load_weights, mtp_copies_alike
from dsv3.core.model import DeepseekV3
from dsv3.core.profile import Profile, select_profile, validate_for_backend, with_overrides
from dsv3.core.sampling import SamplingParams, choice_seed, generation_defaults
from dsv3.core.tokenizer import Tokenizer
from dsv3.parallel import launch, memory, sharding
from dsv3.plugins.manager import Registry, create_registry, for_weight_format, resolve_ops


def build_runtime(profile: Profile, registry: Registry, warn: Callable[[str], None] | None = None):
    """Backend spec, device, op table and dtypes for a profile; fails before touching weights."""
    spec = registry.backend(profile.backend)
    validate_for_backend(profile, spec)
    problems = [p for ps in registry.pm.hook.dsv3_validate_profile(profile=profile) if ps for p in ps]
    if problems:
        raise ProfileError(f"{profile.source}: " + "; ".join(problems))
    missing = spec.probe()
    if missing:
        raise ProfileError(f"backend {spec.name!r} cannot run here: {missing}. `dsv3-run backends` lists what "
                           f"this machine has; the cpu backend runs anywhere")
    device = _device(profile.device or spec.device_type, spec.device_type)
    kwargs = {"warn": warn} if warn else {}
    ops = resolve_ops(registry, spec.name, profile.ops, profile.strict, **kwargs)
    return spec, device, ops


def _device(name: str, default: str) -> torch.device:
    """The torch device `name`, if this machine has it."""
    hint = f"leave device unset for the backend's default ({default})" if name != default else "use the cpu backend"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ProfileError(f"device = {name!r} is not a torch device; use e.g. cpu, cuda, cuda:1") from None
    module = getattr(torch, device.type, None)       # torch.cuda, torch.xpu, ... (torch.npu once torch_npu loads)
    if device.type in ("cpu", "meta") or not hasattr(module, "is_available"):
        return device
    if not module.is_available():
        raise ProfileError(f"device = {name!r}: this machine has no {device.type} device (torch.{device.type}."
                           f"is_available() is False); {hint}")
    count = module.device_count()
    if device.index is not None and device.index >= count:
        raise ProfileError(f"device = {name!r}: this machine has {count} {device.type} device(s), "
                           f"{device.type}:0 to {device.type}:{count - 1}")
    return device


class Completion(str):
    """A completion's text, with how it ended: `finish_reason` "stop" (EOS, a stop string or a stop
    token id) or "length" (max_new_tokens, or the model's context or the latent cache ran out first:
    see `LLM.max_total_tokens`), and its `token_ids`. With `logprobs=N`, `logprobs` holds one
    (logprob, top ids, top logprobs) per token (N alternatives, of the distribution sampled from);
    with `prompt_logprobs=N`, `prompt_logprobs` the same for each prompt token after the first."""

    def __new__(cls, text: str = "", finish_reason: str | None = None, token_ids: list[int] | None = None,
                logprobs: list | None = None, prompt_logprobs: list | None = None):
        self = super().__new__(cls, text)
        self.finish_reason, self.token_ids = finish_reason, list(token_ids or [])
        self.logprobs, self.prompt_logprobs = logprobs, prompt_logprobs
        return self


class ChatReply(dict):
    """One assistant message as OpenAI writes it: `content`, `tool_calls` (id, type, function name and
    arguments JSON) when the model called tools, `reasoning_content` for reasoning models (R1, V3.1
    thinking); with `finish_reason` ("stop", "length", "tool_calls") and the output's `token_ids`."""

    def __init__(self, message: dict, finish_reason: str | None, token_ids: list[int]):
        super().__init__(message)
        self.finish_reason, self.token_ids = finish_reason, list(token_ids)


class LLM:
    def __init__(self, model_path: str | Path | None = None, backend: str | None = None, dtype: str | None = None,
                 profile: str | Profile | None = None, registry: Registry | None = None, **overrides):
        if model_path is None:
            from dsv3.demo import demo_model_path
            model_path = demo_model_path()
        self.registry = registry or create_registry()
        given = {"dtype": dtype, **overrides}
        if isinstance(profile, Profile):
            if backend is not None and self.registry.backend(backend).name != self.registry.backend(profile.backend).name:
                raise ProfileError(f"backend {backend!r} contradicts profile {profile.source} (backend "
                                   f"{profile.backend!r}); give one or the other")
            self.profile = with_overrides(profile, given)
        else:   # --profile, else --backend's default profile, else cpu; then the flags
            self.profile = select_profile(self.registry, backend, profile, given)
        self.spec, self.device, self.ops = build_runtime(self.profile, self.registry)
        # parallelism (dsv3.parallel): under torchrun this process is one rank of the mesh and holds
        # one slice of the model; in a single process the mesh is SINGLE and nothing below changes.
        self.mesh, self.device = launch.setup(self.profile, self.registry, self.spec.name, self.device)

        path = Path(model_path).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such directory; the model path is a DeepSeek-V3 HF checkpoint "
                                  f"directory (config.json, safetensors, tokenizer.json)" if not path.exists() else
                                  f"{path}: not a directory; the model path is the checkpoint's directory, not a file")
        self.ckpt = Checkpoint(model_path)
        self.path = self.ckpt.path
        self.config = ModelConfig.from_file(self.path / "config.json")
        self.dtype = getattr(torch, self.profile.dtype)
        fmt = self.profile.weight_format
        self.weight_format = checkpoint_format(self.ckpt) if fmt == "auto" else fmt
        if self.weight_format not in self.spec.weight_formats:
            raise ProfileError(f"the checkpoint's weight format {self.weight_format!r} cannot run on backend "
                               f"{self.spec.name!r}; set weight_format to one of {', '.join(self.spec.weight_formats)}")
        self.ops = for_weight_format(self.ops, self.weight_format, self.registry.warn, self.profile.strict)
        with_mtp = self.config.num_nextn_predict_layers > 0 and has_mtp(self.ckpt, self.config.num_hidden_layers)
        slicer = None
        if self.mesh.distributed:   # parallel: check the split fits the model, then read only this rank's slice
            sharding.check_layout(self.config, self.mesh, checkpoint_format(self.ckpt), self.profile.source)
            slicer = sharding.slicer(self.config, self.mesh)
        # refuse, before anything is allocated, what this device cannot hold (naming the key to change)
        memory.check_fits(self.config, self.profile, self.device, self.weight_format, with_mtp, self.mesh,
                          source=str(self.path / "config.json"),
                          shared=with_mtp and mtp_copies_alike(self.ckpt, self.config))
        with torch.device(self.device):
            self.model = DeepseekV3(self.config, self.ops, self.weight_format, self.dtype, with_mtp=with_mtp,
                                    mesh=self.mesh)
        ue8m0 = self.profile.ue8m0 if self.profile.ue8m0 is not None else bool(
            self.config.quantization and self.config.quantization.scale_fmt == "ue8m0")
        self.model.set_act_scale_fmt("ue8m0" if ue8m0 else None)   # FP8 activation scales, part of each weight
        load_weights(self.model, self.ckpt, ue8m0=ue8m0, slicer=slicer,
                     progress=None if self.mesh.rank == 0 else False)   # one progress line, from rank 0
        self.ckpt.close()
        self.registry.pm.hook.dsv3_prepare_weights(backend=self.spec.name, model=self.model, profile=self.profile)
        self.tokenizer = Tokenizer(self.path) if (self.path / "tokenizer.json").is_file() else None
        kv = self.profile.kv_cache
        self.cache_dtype = self.dtype if kv.dtype == "auto" else getattr(torch, kv.dtype)
        self.cache = LatentCache(self.model.num_cache_layers, -(-kv.max_tokens // kv.block_size), kv.block_size,
                                 self.config.cache_dim, self.cache_dtype, self.device)   # V3.2: + indexer keys
        runner = self.registry.pm.hook.dsv3_model_runner(backend=self.spec.name, model=self.model, profile=self.profile)
        if self.mesh.data_parallel and runner is not None:
            # the groups agree on each MoE layer's rows on the host (a device->host read per layer), which
            # a captured graph cannot hold; graphs over a batch size agreed per step are not built yet
            if self.mesh.rank == 0:
                print("dsv3: parallel.dp > 1 runs eager (no CUDA graphs)", file=sys.stderr)
            runner = None
        spec = self.profile.speculative
        self.engine = Engine(self.model, self.cache, self.tokenizer, self.profile.max_batch_tokens, runner,
                             num_draft_tokens=spec.num_draft_tokens if spec.method == "mtp" else 0,
                             draft_policy=spec.policy)
        # the checkpoint's generation_config.json: temperature / top_p / top_k / repetition_penalty where
        # a call leaves them unset (None); without one, greedy decoding
        self.generation_defaults = generation_defaults(self.path)

    # -- generation ---------------------------------------------------------------------------------
    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise RequestError(f"{self.path} has no tokenizer.json; text generation needs the checkpoint's tokenizer")
        return self.tokenizer

    @property
    def max_total_tokens(self) -> int:
        """Longest prompt + output one sequence may reach: the model's context, and the latent cache
        less the slots speculative decoding reserves (one sequence must fit the cache on its own).
        Generation past it ends with finish_reason "length"; the server refuses such requests."""
        return min(self.engine.max_context, self.engine.capacity_tokens - self.engine.reserve)

    def generate(self, prompts: str | list[str], max_new_tokens: int = 64, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                 stop: list[str] | tuple[str, ...] = (), on_output: Callable[[int, StepOutput], None] | None = None,
                 n: int = 1, **params) -> Completion | list:
        """Complete one prompt (a str: returns its Completion) or each of a list (returns a list);
        `on_output(index, out)` sees text as it is produced (streaming). temperature / top_p / top_k
        left None take the checkpoint's generation_config.json values, else greedy (temperature 0).
        `n` > 1: n choices per prompt (a list of n Completions each; the prompt is computed once).
        More sampling keywords (SamplingParams): presence_penalty, frequency_penalty,
        repetition_penalty, logit_bias ({token id: bias}), min_tokens, stop_token_ids, logprobs,
        prompt_logprobs, ignore_eos. Structured output: `json_schema` (a JSON schema: the output is
        JSON valid under it) or `response_format` (OpenAI's: {"type": "json_object"}, ...)."""
        if isinstance(prompts, str):
            return self.generate([prompts], max_new_tokens, temperature, top_p, top_k, seed, stop, on_output,
                                 n, **params)[0]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"generate() takes a prompt string or a list of them, not {type(prompts).__name__}; "
                            f"token ids go to generate_ids()")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"generate(): prompts[{i}] is {type(p).__name__}, not str; token ids go to "
                                f"generate_ids()")
        tok = self._tokenizer()
        texts = self.generate_ids([tok.encode(p) for p in prompts], max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
                                  on_output=on_output, n=n, **params)[1]
        return texts if n == 1 else [texts[i * n: (i + 1) * n] for i in range(len(prompts))]

    def sampling_params(self, **params) -> SamplingParams:
        """SamplingParams from keywords, with the checkpoint's defaults where a sampling value is None
        (or absent); logit_bias may be a {token id: bias} dict, stop / stop_token_ids lists;
        `json_schema` (a schema) or `response_format` (OpenAI's) become the grammar."""
        schema, answer_format = params.pop("json_schema", None), params.pop("response_format", None)
        if schema is not None and answer_format is not None:
            raise RequestError("give json_schema or response_format, not both")
        if schema is not None:
            params["grammar"] = grammar.json_schema(schema)
        elif answer_format is not None:
            params["grammar"] = grammar.response_format(answer_format)
        for key, fallback in (("temperature", 0.0), ("top_p", 1.0), ("top_k", 0), ("repetition_penalty", 1.0)):
            if params.get(key) is None:
                params[key] = self.generation_defaults.get(key, fallback)
        bias = params.get("logit_bias")
        if isinstance(bias, dict):
            params["logit_bias"] = tuple((int(t), float(b)) for t, b in bias.items())
        for key in ("stop", "stop_token_ids", "logit_bias"):
            if key in params:
                params[key] = tuple(params[key] or ())
        return SamplingParams(**params)

    def generate_ids(self, prompts: list[list[int]], on_output=None, seed: int | None = None,
                     stop=(), n: int = 1, **params) -> tuple[list[list[int]], list[Completion]]:
        """Token-level generation: returns (output token ids, output texts) per prompt, or with n > 1
        per choice (prompt i's choice j at i * n + j; its seed derives from (seed + i, j))."""
        if not isinstance(n, int) or n < 1:
            raise RequestError(f"n = {n!r}: must be an integer >= 1")
        base = self.sampling_params(stop=stop, **params)
        # data-parallel attention: each group generates its share of the prompts (the same share on every
        # rank: least loaded by cache blocks, in order), and the results are exchanged at the end
        mine = (self._group_share(prompts, n, base.max_new_tokens) if self.mesh.data_parallel
                else range(len(prompts)))
        seqs, index = [], {}
        for i in mine:
            for j, s in enumerate(self.engine.add_choices(prompts[i], [
                    dataclasses.replace(base, seed=choice_seed(None if seed is None else seed + i, j))
                    for j in range(n)])):
                seqs.append(s)
                index[s.id] = i * n + j
        try:
            self.engine.run_to_completion(None if on_output is None else lambda o: on_output(index[o.seq.id], o))
        finally:
            for s in seqs:
                if not s.finished:
                    self.engine.release(s)
        done = {index[s.id]: Completion(s.text, s.finish_reason, s.output_ids,
                                        s.logprobs if s.params.logprobs is not None else None,
                                        s.prompt_logprobs if s.params.prompt_logprobs is not None else None)
                for s in seqs}
        if self.mesh.data_parallel:
            done = self._exchange_completions(done)
        ordered = [done[k] for k in range(len(prompts) * n)]
        return [c.token_ids for c in ordered], ordered

    def _group_share(self, prompts: list[list[int]], n: int, max_new_tokens: int) -> list[int]:
        """The prompts this data-parallel group generates: each prompt goes to the group with the fewest
        cache blocks assigned so far (ties: the lowest group), so every rank computes the same split."""
        load, share = [0] * self.mesh.dp, []
        for i, ids in enumerate(prompts):
            g = min(range(self.mesh.dp), key=lambda k: load[k])
            load[g] += n * self.cache.blocks_needed(min(len(ids) + max_new_tokens, self.max_total_tokens))
            if g == self.mesh.dp_rank:
                share.append(i)
        return share

    def _exchange_completions(self, done: dict[int, Completion]) -> dict[int, Completion]:
        def entries(e):
            return None if e is None else [None if x is None else tuple(x) for x in e]
        mine = {k: [str(c), c.finish_reason, c.token_ids, c.logprobs, c.prompt_logprobs] for k, c in done.items()}
        merged = {}
        for theirs in self.mesh.comm.gather_json(mine):
            for k, (text, finish, ids, logprobs, prompt_logprobs) in theirs.items():
                merged[int(k)] = Completion(text, finish, ids, entries(logprobs), entries(prompt_logprobs))
        return merged

    def chat(self, messages: list[dict], tools: list[dict] | None = None, tool_choice: str | dict | None = None,
             parallel_tool_calls: bool = True, template_kwargs: dict | None = None, max_new_tokens: int = 256,
             n: int = 1, **params) -> ChatReply | list[ChatReply]:
        """One assistant turn after `messages` (OpenAI chat messages, tool calls and tool results
        included), rendered through the checkpoint's chat template; a ChatReply (n > 1: a list).
        `tools` are OpenAI function tools; `tool_choice` "auto" (the default with tools), "none",
        "required" or {"type": "function", "function": {"name": ...}} (the last two constrain the
        answer to calls whose arguments follow the functions' schemas); `template_kwargs` are more
        template variables (V3.1: {"thinking": True}). Other keywords as for generate(),
        json_schema / response_format included."""
        from dsv3.serve.chat import plan     # the server's own reading of tools and answers (no HTTP stack)
        tok = self._tokenizer()
        schema, answer_format = params.pop("json_schema", None), params.pop("response_format", None)
        if schema is not None:
            if answer_format is not None:
                raise RequestError("give json_schema or response_format, not both")
            answer_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
        chat = plan(tok, [dict(m) for m in messages], tools, tool_choice, parallel_tool_calls, answer_format,
                    template_kwargs)
        text, ids = tok.chat_prompt(chat.messages, chat.tools, chat.template_kwargs)
        outputs = [chat.output(tok, text) for _ in range(n)]     # (reader, grammar): a reader per choice
        _, done = self.generate_ids([ids], n=n, max_new_tokens=max_new_tokens, grammar=outputs[0][1], **params)
        replies = []
        for (output, _), completion in zip(outputs, done):
            output.feed(completion)
            output.finish()
            message = output.message()
            finish = completion.finish_reason
            replies.append(ChatReply(message, "tool_calls" if message.get("tool_calls") and finish == "stop"
                                     else finish, completion.token_ids))
        return replies[0] if n == 1 else replies

    # -- scoring ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _prefill(self, token_ids: list[list[int]]):
        """Full-sequence forward without reusing any cache: (hidden [T, D], batch, scratch cache)."""
        if not token_ids or any(len(t) == 0 for t in token_ids):
            raise RequestError("every sequence needs at least one token")
        longest = max(len(t) for t in token_ids)
        if longest > self.config.max_position_embeddings:
            raise RequestError(f"sequence of {longest} tokens exceeds the context of "
                               f"{self.config.max_position_embeddings} (max_position_embeddings)")
        bs = self.cache.block_size
        blocks_per = [-(-len(t) // bs) for t in token_ids]
        scratch = LatentCache(self.model.num_cache_layers, sum(blocks_per), bs, self.config.cache_dim,
                              self.cache_dtype, self.device)
        chunks, start = [], 0
        for ids, nb in zip(token_ids, blocks_per):
            chunks.append(Chunk(list(ids), 0, list(range(start, start + nb))))
            start += nb
        batch = Batch.build(chunks, bs, self.device)
        return self.model(batch, scratch.layers), batch, scratch, chunks

    def _pad(self, rows: list[torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(len(rows), max(r.shape[0] for r in rows), rows[0].shape[-1], dtype=torch.float32)
        for i, r in enumerate(rows):
            out[i, : r.shape[0]] = r.float().cpu()
        return out

    def logits(self, token_ids: list[list[int]]) -> torch.Tensor:
        """[B, T, vocab] float32 logits of the main model; ragged batches are right-padded with zeros."""
        hidden, batch, _, _ = self._prefill(token_ids)
        with torch.inference_mode():
            return self._pad([self.model.logits(hidden[rows]) for rows in batch.token_rows])

    def mtp_logits(self, token_ids: list[list[int]]) -> torch.Tensor:
        """[B, T-1, vocab]: at position i, the MTP module's logits for token i+2 given tokens up to i+1."""
        if not self.model.has_mtp:
            raise RequestError(f"{self.path} has no MTP layer (num_nextn_predict_layers = 0 or its tensors are absent)")
        if any(len(t) < 2 for t in token_ids):
            raise RequestError("mtp_logits needs sequences of at least 2 tokens")
        hidden, batch, scratch, chunks = self._prefill(token_ids)
        with torch.inference_mode():
            mtp_chunks = [Chunk(list(ids[1:]), 0, c.blocks) for ids, c in zip(token_ids, chunks)]
            mtp_batch = Batch.build(mtp_chunks, scratch.block_size, self.device)
            prev = torch.cat([hidden[rows[:-1]] for rows in batch.token_rows])    # h_0 .. h_{n-2} per sequence
            h = self.model.mtp_hidden(mtp_batch.input_ids, prev, mtp_batch, scratch.layers)
            return self._pad([self.model.mtp.logits(h[rows]) for rows in mtp_batch.token_rows])

