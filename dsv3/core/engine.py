"""The engine: sequences in, tokens out, one flat batch per step.

step() = schedule (Scheduler: admission, chunked prefill, preemption, the prefix cache), run
(ModelRunner: the batch, the model, sampling and draft verification on the device, one
device->host copy), post-process (append tokens; EOS, max tokens, stop strings, context limit;
then MTP drafting for the next step, when the DraftPolicy says it pays).

A server sets `isolate_failures`: a step that raises is run again one sequence at a time, and only
the sequences that fail alone end (finish_reason "error", StepOutput.error), so one request that
breaks an op (a bad kernel shape, a plugin that raises) fails on its own. Offline callers see the
exception.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from dsv3.core.cache import LatentCache
from dsv3.core.errors import RequestError
from dsv3.core.grammar import compiler_for
from dsv3.core.model import DeepseekV3
from dsv3.core.runner import ModelRunner, StepResult
from dsv3.core.sampling import SamplingParams
from dsv3.core.scheduler import QueueFullError, Scheduler, Sequence
from dsv3.core.speculative import DraftPolicy, MTPDrafter, SpecStats
from dsv3.core.tokenizer import Tokenizer

__all__ = ["Engine", "EngineStats", "QueueFullError", "Sequence", "StepOutput"]
log = logging.getLogger("dsv3.engine")


@dataclass
class StepOutput:
    seq: Sequence
    delta: str          # new text safe to show (held back while it may start a stop string)
    finished: bool
    new_tokens: list[int] = field(default_factory=list)
    error: str | None = None   # set when this sequence failed (isolate_failures): what went wrong
    new_logprobs: list = field(default_factory=list)   # a LogprobEntry per new token (params.logprobs set)


def _stop_prefix_at_end(text: str, stop: str) -> int:
    """Length of the longest proper prefix of `stop` that `text` ends with (0 if none): the leftmost
    place in text's last len(stop) - 1 characters where the rest of text starts `stop`."""
    tail = text[max(0, len(text) - len(stop) + 1):] if len(stop) > 1 else ""
    i = tail.find(stop[0])
    while i >= 0:
        if stop.startswith(tail[i:]):
            return len(tail) - i
        i = tail.find(stop[0], i + 1)
    return 0



STEP_PHASES = ("schedule", "prepare", "launch", "wait", "post")


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    prefix_cached_tokens: int = 0      # prompt tokens served from shared blocks instead of computed
    preemptions: int = 0
    # host seconds of the steps by phase: scheduling, building the batch, enqueueing forward and sampling,
    # waiting for the device (the step's device->host read), post-processing (detokenising, stops, drafting)
    phases: dict = field(default_factory=lambda: dict.fromkeys(STEP_PHASES, 0.0))

    spec: SpecStats = field(default_factory=SpecStats)

    def summary(self) -> str:
        rate = self.generated_tokens / self.seconds if self.seconds else 0.0
        text = (f"{self.generated_tokens} tokens generated in {self.seconds:.2f} s ({rate:.1f} tok/s), "
                f"{self.prefill_tokens} prompt tokens, {self.steps} steps")
        if self.prefix_cached_tokens:
            text += f", {self.prefix_cached_tokens} prompt tokens from the prefix cache"
        if self.preemptions:
            text += f", {self.preemptions} preemptions"
        return text + (f"; {self.spec.summary()}" if self.spec.verify_steps else "")


class Engine:
    def __init__(self, model: DeepseekV3, cache: LatentCache, tokenizer: Tokenizer | None = None,
                 max_batch_tokens: int = 2048, runner=None, num_draft_tokens: int = 0,
                 prefix_caching: bool = True, max_waiting: int | None = None,
                 draft_policy: str | DraftPolicy = "adaptive"):
        self.model, self.cache, self.tokenizer = model, cache, tokenizer
        self.max_context = model.cfg.max_position_embeddings
        self.device = cache.layers[0].device
        self.stats = EngineStats()
        # `runner` is the forward a backend supplies (e.g. CUDA-graph replay); the ModelRunner wraps it
        self.runner = ModelRunner(model, cache, runner)
        self.drafter = (MTPDrafter(model, cache, num_draft_tokens, getattr(runner, "mtp_hidden", None))
                        if num_draft_tokens else None)
        if self.drafter and not model.has_mtp:
            raise RequestError("speculative decoding with MTP needs the checkpoint's MTP layer "
                               "(num_nextn_predict_layers = 1 and its tensors); this model has none")
        k = num_draft_tokens if self.drafter else 0
        # "adaptive": draft only while it pays at the running batch size; "always": every step
        if not isinstance(draft_policy, DraftPolicy) and draft_policy not in ("adaptive", "always"):
            raise ValueError(f"draft_policy {draft_policy!r}: expected 'adaptive', 'always' or a DraftPolicy")
        self.policy = (draft_policy if isinstance(draft_policy, DraftPolicy)
                       else DraftPolicy(k, fixed=None if draft_policy == "adaptive" else True))
        self._drafted = False      # whether this step drafted (for the next)
        self.reserve = k + 1 if k else 0
        self.tokens_per_decode = k + 1
        self.scheduler = Scheduler(cache, max_batch_tokens, self.reserve, key_span=1 if k else 0,
                                   prefix_caching=prefix_caching, max_waiting=max_waiting)
        self.isolate_failures = False

    # the scheduler's knobs and queues, as the server and the tests see them
    max_batch_tokens = property(lambda self: self.scheduler.max_batch_tokens,
                                lambda self, v: setattr(self.scheduler, "max_batch_tokens", v))
    prefix_caching = property(lambda self: self.scheduler.prefix_caching,
                              lambda self, v: setattr(self.scheduler, "prefix_caching", v))
    max_waiting = property(lambda self: self.scheduler.max_waiting,
                           lambda self, v: setattr(self.scheduler, "max_waiting", v))
    waiting = property(lambda self: self.scheduler.waiting)
    running = property(lambda self: self.scheduler.running)

    @property
    def capacity_tokens(self) -> int:
        return self.cache.num_blocks * self.cache.block_size

    def add(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        return self.add_choices(prompt_ids, [params])[0]

    def add_choices(self, prompt_ids: list[int], params: list[SamplingParams]) -> list[Sequence]:
        """One sequence per params, all completing the same prompt (the n choices of a request). The
        first is scheduled; the others wait on it and, in the step that computes its prompt, are
        sampled from the same logits row and fork: its full cache blocks shared, the partial last
        one copied. So the prompt is computed once however many choices there are."""
        seqs = self._sequences(prompt_ids, params)
        self.scheduler.add(seqs[0])
        seqs[0].followers = seqs[1:]
        for f in seqs[1:]:
            f.leader = seqs[0]
        return seqs

    def check_request(self, prompt_ids: list[int], params: list[SamplingParams]) -> None:
        """Raise the RequestError add_choices would raise, adding nothing (a data-parallel server's rank
        0 checks requests it sends to another group's engine, which has the same limits)."""
        self._sequences(prompt_ids, params, draw_seeds=False)

    def _sequences(self, prompt_ids: list[int], params: list[SamplingParams], draw_seeds: bool = True) -> list[Sequence]:
        if not prompt_ids:
            raise RequestError("empty prompt: give at least one token")
        if len(prompt_ids) >= self.max_context:
            raise RequestError(f"prompt is {len(prompt_ids)} tokens but the model's context is "
                               f"{self.max_context} (max_position_embeddings); shorten the prompt")
        if self.cache.blocks_needed(len(prompt_ids) + 1 + self.reserve) > self.cache.num_blocks:
            raise RequestError(f"prompt is {len(prompt_ids)} tokens but the latent cache holds "
                               f"{self.capacity_tokens - 1 - self.reserve} prompt tokens at most; raise "
                               f"the profile's kv_cache.max_tokens (--max-cache-tokens on the command line) or shorten the prompt")
        vocab = self.model.cfg.vocab_size
        seqs = []
        for p in params:
            for key, ids in (("logit_bias", [t for t, _ in p.logit_bias]), ("stop_token_ids", p.stop_token_ids)):
                bad = [t for t in ids if t >= vocab]
                if bad:
                    raise RequestError(f"{key}: token id {bad[0]} is outside the vocabulary [0, {vocab})")
            # Unseeded requests draw their key from torch's global generator, which a parallel launch seeds
            # alike on every rank, so the ranks sample alike.
            if p.seed is not None:
                seed = p.seed
            elif draw_seeds:
                seed = int(torch.randint(0, 2**62, ()))
            else:
                seed = 0          # check_request: the sequence is thrown away
            seq = Sequence(list(prompt_ids), len(prompt_ids), p, seed=seed)
            if p.grammar is not None:
                if self.tokenizer is None:
                    raise RequestError("structured output needs the checkpoint's tokenizer (tokenizer.json); "
                                       "this engine has none")
                cfg = self.model.cfg
                seq.grammar = compiler_for(self.tokenizer, vocab, tuple(cfg.eos_token_ids)).matcher(p.grammar)
            seqs.append(seq)
        return seqs

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def release(self, seq: Sequence) -> None:
        """Drop a sequence (finished, or abandoned by its caller) and free its blocks now."""
        self.scheduler.release(seq)

    def world_has_work(self) -> bool:
        """has_work() on any rank: under data-parallel attention every rank steps while any group has
        work (one all_reduce); otherwise every rank runs the same schedule and has_work() is the same."""
        mesh = self.model.mesh
        return mesh.comm.any_rank(self.has_work()) if mesh.data_parallel else self.has_work()

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One step: schedule, run, post-process (and draft). Under data-parallel attention it is a
        collective: every rank calls it (a group without work too), and it returns when every group's
        step is done (DeepseekV3.join_other_groups)."""
        try:
            return self._step()
        finally:
            if self.model.mesh.data_parallel:
                self.model.join_other_groups()

    def _step(self) -> list[StepOutput]:
        t0 = time.perf_counter()
        plan, outgrown = self.scheduler.schedule()
        outputs = [self._finish(s, "length") for s in outgrown]
        if plan:
            verified, self._drafted = any(s.drafts for s, _ in plan), False
            t1 = time.perf_counter()
            results, failed = self._run(plan)
            t2 = time.perf_counter()
            outputs += failed + [out for r in results for out in self._post_process(r)]
            seconds = time.perf_counter() - t0
            self._account(plan, outputs, seconds, results, schedule_s=t1 - t0, post_s=t0 + seconds - t2)
            # the policy times decode-only steps that verified and drafted, or did neither
            if self.drafter and self.policy.adaptive and verified == self._drafted and all(c.decode for _, c in plan):
                self.policy.observe_step(verified, len(plan), self._agreed_seconds(seconds))
        return outputs

    def _agreed_seconds(self, seconds: float) -> float:
        """The ranks' mean step time in a parallel run (one scalar all-reduce), so that every rank's
        DraftPolicy decides alike and the ranks stay in lockstep; this rank's time otherwise. Under
        data-parallel attention only a group's own ranks run the same schedule: the mean over the group."""
        mesh = self.model.mesh
        if not mesh.distributed or (mesh.data_parallel and mesh.tp == 1):
            return seconds
        total = torch.tensor([seconds], dtype=torch.float64, device=self.device)
        if mesh.data_parallel:
            return float(mesh.comm.tp_reduce(total)) / mesh.tp
        return float(mesh.comm.world_reduce(total)) / mesh.world

    def _run(self, plan) -> tuple[list[StepResult], list[StepOutput]]:
        try:
            return [self.runner.run(plan)], []
        except Exception:  # noqa: BLE001 - isolate below, or re-raise
            if not self.isolate_failures:
                raise
            log.exception("engine step over %d sequences failed; retrying each on its own", len(plan))
        results, failed = [], []
        for item in plan:
            try:
                results.append(self.runner.run([item]))
            except Exception as e:  # noqa: BLE001 - this sequence's own failure
                log.warning("sequence %d failed on its own too: %s: %s", item[0].id, type(e).__name__, e)
                failed.append(self._fail(item[0], e))
        return results, failed

    def _post_process(self, r: StepResult) -> list[StepOutput]:
        """Advance each sequence by its new tokens (EOS, max tokens, stop strings, context), then draft."""
        outputs, drafting = [], []
        forks: dict[int, list] = {}
        for i, f, tokens, entries in r.forks:
            forks.setdefault(i, []).append((f, tokens, entries))
        for i, ((s, c), tokens, accepted) in enumerate(zip(r.plan, r.tokens, r.accepted)):
            start = s.num_cached
            if accepted is not None:
                self.stats.spec.record(len(s.drafts), accepted)
                self.policy.observe_acceptance(len(s.drafts), accepted)
                s.num_cached += accepted + 1                 # roll back: positions after the accepted drafts are void
            else:
                s.num_cached += len(c.token_ids)
            s.drafts, s.draft_probs = [], None
            if r.prompt_logprobs[i]:
                s.prompt_logprobs += r.prompt_logprobs[i]
            for f, f_tokens, f_entries in forks.get(i, []):     # n > 1: before s may finish and free its blocks
                s.followers.remove(f)
                f.leader = None
                f.prompt_logprobs = list(s.prompt_logprobs)
                if self.scheduler.fork(s, f):
                    out = self._append_all(f, f_tokens, f_entries)
                    if out is not None:
                        outputs.append(out)
                else:      # no blocks for it now: it waits, and recomputes what the prefix cache lacks
                    self.scheduler.waiting.appendleft(f)
            out = self._append_all(s, tokens, r.logprobs[i])
            if out is not None:
                outputs.append(out)
            # rows the drafter cannot sample like the target take no drafts: grammar (its mask), logit
            # edits and logprobs (LogitsProcessing and the entries come from the verify-free path), forks
            p = s.params
            if (self.drafter and not s.finished and s.grammar is None and not s.forked
                    and not (p.penalized or p.logit_bias or p.logprobs is not None
                             or s.num_output < p.min_tokens)
                    and s.num_cached + self.drafter.k < self.max_context):
                drafting.append((s, start, s.num_cached, r.hidden[r.batch.token_rows[i][: s.num_cached - start]]))
        for failed_seq, e in self._draft(drafting, len(r.plan)):   # schedule() reserved the blocks drafting writes
            outputs = [o for o in outputs if o.seq is not failed_seq] + [self._fail(failed_seq, e)]
        for s, _ in r.plan:
            if not s.finished:
                self.scheduler.register_blocks(s)
        return outputs

    def _draft(self, work: list[tuple], batch: int) -> list[tuple[Sequence, Exception]]:
        """Propose the next drafts, or only bring the MTP cache up to date where the policy says drafting
        does not pay now; returns the sequences whose drafting failed (isolated like a step)."""
        if not work:
            return []
        self._drafted = self.policy.decide(batch)
        run = self.drafter.draft if self._drafted else self.drafter.catch_up
        try:
            groups, failures = [work], []
            run(work, self.device)
        except Exception:  # noqa: BLE001
            if not self.isolate_failures:
                raise
            log.exception("MTP drafting over %d sequences failed; retrying each on its own", len(work))
            groups, failures = [], []
            for w in work:
                w[0].drafts, w[0].draft_probs = [], None
                try:
                    run([w], self.device)
                    groups.append([w])
                except Exception as e:  # noqa: BLE001
                    failures.append((w[0], e))
        for group in groups:
            for s, _, end, _ in group:
                s.mtp_valid = end
        return failures

    def _account(self, plan, outputs: list[StepOutput], seconds: float, results: list[StepResult],
                 schedule_s: float, post_s: float) -> None:
        st = self.stats
        st.steps += 1
        st.phases["schedule"] += schedule_s
        for r in results:                          # the runner's own: prepare, launch, wait
            for name, dt in zip(("prepare", "launch", "wait"), r.phases):
                st.phases[name] += dt
        st.phases["post"] += post_s
        st.prefill_tokens += sum(len(c.token_ids) for _, c in plan if not c.decode)
        st.generated_tokens += sum(len(o.new_tokens) for o in outputs)
        st.seconds += seconds
        sch = self.scheduler                      # its counters since the last step
        st.prefix_cached_tokens += sch.prefix_cached_tokens
        st.preemptions += sch.preemptions
        sch.prefix_cached_tokens = sch.preemptions = 0

    def _finish(self, s: Sequence, reason: str) -> StepOutput:
        s.finish_reason = reason
        delta = self._detokenize(s)
        self.release(s)
        return StepOutput(s, delta, True, [])

    def _fail(self, s: Sequence, error: Exception) -> StepOutput:
        """End one sequence with an error the caller can report; its blocks are freed."""
        s.finish_reason = "error"
        s.drafts, s.draft_probs = [], None
        self.release(s)
        return StepOutput(s, "", True, [], error=f"{type(error).__name__}: {error}")

    def _append_all(self, s: Sequence, tokens: list[int], logprobs: list | None = None) -> StepOutput | None:
        """Append this step's tokens (one, or several after speculative verification) and post-process;
        `logprobs`: their LogprobEntry each, kept for the tokens that are appended."""
        if not tokens:
            return None
        before = s.num_output
        p = s.params
        for k, token in enumerate(tokens):
            if (not p.ignore_eos and token in self.model.cfg.eos_token_ids) or token in p.stop_token_ids:
                s.finish_reason = "stop"       # EOS (or a stop token id) ends the text; it is not part of it
                break
            if s.grammar is not None and not s.grammar.accept(token):
                # the runner masked every token the grammar refuses, so this is a bug, this sequence's own
                ended = " after it had ended" if s.grammar.terminated else ""
                return self._fail(s, RuntimeError(f"the grammar refused token {token}{ended}, which its bitmask "
                                                  f"allowed"))
            s.token_ids.append(token)
            if logprobs is not None:
                s.logprobs.append(logprobs[k])
            if s.grammar is not None and s.grammar.terminated:     # complete, and its EOS taken (ignore_eos)
                s.finish_reason = "stop"
                break
            if s.num_output >= p.max_new_tokens or len(s.token_ids) >= self.max_context:
                s.finish_reason = "length"
                break
        delta = self._detokenize(s)
        if s.finished:
            self.release(s)
        return StepOutput(s, delta, s.finished, s.token_ids[s.prompt_len + before:],
                          new_logprobs=s.logprobs[before:] if p.logprobs is not None else [])

    def _detokenize(self, s: Sequence) -> str:
        """Update s.text; return the newly visible part. Stops at (and drops) the first stop string.
        Each step looks for stop strings only in the text that could hold a new match, and holds back
        the longest tail that could start one: linear in the stop strings' length, not quadratic."""
        if self.tokenizer is None:
            return ""
        text = self._decoded(s)
        if s.params.stop:
            hits = [i for stop in s.params.stop
                    if (i := text.find(stop, max(0, s.stop_scanned - len(stop)))) >= 0]
            if hits:
                text, s.finish_reason = text[: min(hits)], "stop"
        if not s.finished:
            # text before the last few characters no longer changes as tokens arrive (a token decodes
            # to at most one replacement character per byte); rescan a margin behind it next step
            s.stop_scanned = max(0, len(text) - 8)
            text = text[: len(text) - max((_stop_prefix_at_end(text, stop) for stop in s.params.stop), default=0)]
        s.text = text if s.finished or len(text) > len(s.text) else s.text
        delta, s.emitted = s.text[s.emitted:], max(s.emitted, len(s.text))
        return delta

    def _decoded(self, s: Sequence) -> str:
        """s.decoded extended by this step's tokens, decoding only a window of the newest ones (vLLM's
        incremental detokenisation): the text of ids[from:] minus that of ids[from:to] is what the new
        tokens add, whatever the tokenizer does at a window's start. New tokens ending inside a UTF-8
        character wait for its next byte; at the end everything is flushed, as a whole decode gives."""
        ids = s.output_ids
        window = self.tokenizer.decode(ids[s.decoded_from:])
        known = self.tokenizer.decode(ids[s.decoded_from:s.decoded_to]) if s.decoded_to > s.decoded_from else ""
        if s.finished or (len(window) > len(known) and not window.endswith("\ufffd")):
            s.decoded += window[len(known):]
            s.decoded_from, s.decoded_to = s.decoded_to, len(ids)
        return s.decoded

    def run_to_completion(self, on_output=None) -> None:
        while self.world_has_work():
            for out in self.step():
                if on_output is not None:
                    on_output(out)

    def warm_up(self, max_batch: int = 128) -> int:
        """Run throwaway requests through the shapes serving meets, so that kernel compilation and
        CUDA-graph capture happen now instead of inside some client's time to first token (on an
        H100 a Triton compile or a capture met mid-run stalled one step by 1.4-2.9 s): a few decode
        steps of 1, 2, 4, ... max_batch sequences, and a lone prefill of n and of n + 1 tokens for every
        power of two n from 16 to max_batch_tokens (shape-specialising compilers key on size ranges
        and on divisibility). The requests are fixed, so every rank of a parallel engine runs the same
        steps in lockstep. With speculation the decode rounds run twice, drafting and not (the policy
        may take either at any batch size). Leaves no sequence, cache block, prefix-cache entry or statistic behind.
        Also builds structured output's grammar compiler, which reads the whole vocabulary (about a
        second at DeepSeek's 129k tokens), so the first request with a schema does not stall the batch.
        Returns the number of engine steps run."""
        if self.has_work():
            raise RuntimeError("warm_up needs an idle engine")
        if self.tokenizer is not None:
            compiler_for(self.tokenizer, self.model.cfg.vocab_size, tuple(self.model.cfg.eos_token_ids))
        saved = self.prefix_caching, self.max_waiting, self.policy
        self.prefix_caching, self.max_waiting = False, None
        vocab = self.model.cfg.vocab_size

        def prompt(n: int, salt: int) -> list[int]:
            return [2 + (salt * 7919 + i * 104729) % (vocab - 2) for i in range(n)]

        longest = min(self.max_batch_tokens, self.max_context - 2,
                      self.capacity_tokens - self.cache.block_size - 2 - self.reserve)
        before, k = self.stats.steps, 1
        try:
            # prefill k x 2 tokens, then several decode steps of k sequences: with speculation, the
            # verify and draft shapes of both accepted and rejected drafts are met only after a few rounds
            new_tokens = 2 + 3 * self.tokens_per_decode
            room = self.cache.num_blocks // self.cache.blocks_needed(2 + new_tokens + self.reserve)
            for drafting in (True, False) if self.drafter else (True,):
                self.policy, k = DraftPolicy(self.drafter.k if self.drafter else 0, fixed=drafting), 1
                while k <= min(max_batch, room):
                    for i in range(k):
                        self.add(prompt(2, i), SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
                    self.run_to_completion()
                    k *= 2
            n = 16
            while n <= longest:
                for length in (n, n + 1):
                    if length <= longest:
                        self.add(prompt(length, length), SamplingParams(max_new_tokens=1, ignore_eos=True))
                        self.run_to_completion()
                n *= 2
            return self.stats.steps - before
        finally:
            self.prefix_caching, self.max_waiting, self.policy = saved
            self.stats = EngineStats()
            self.scheduler.prefix_cached_tokens = self.scheduler.preemptions = 0
