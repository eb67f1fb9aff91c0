"""`LLM`: the public engine. Batch `generate`, or the incremental interface a server drives.

    llm = LLM("path/to/checkpoint", device="cuda", dtype="bfloat16")  # or LLM(path, config=EngineConfig(...))
    outs = llm.generate(["Hello", [0, 5, 9]], SamplingParams(temperature=0, max_tokens=32))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason  # "stop" | "length"

Incremental: `add_request(prompt, params) -> request_id`, then `step()` until `has_unfinished()` is
false; each `step()` returns a `RequestOutput` for every request that got new tokens or finished,
with the new piece in `.new_token_ids` / `.new_text`; `abort(request_id)` drops a request. With stop strings,
`.new_text` holds back the last characters that could begin one until it is ruled out or the request ends, so a
stream never shows text past a stop.

A step = scheduler (`Scheduler.schedule`: continuous batching, chunked prefill, preemption) ->
`ModelRunner.execute` (one forward over the paged latent cache, sampling) -> `Scheduler.postprocess`
(token stops, max_tokens) -> text and stop strings here. Generated token ids include the token that
ended a sequence (EOS or a stop token id); `.text` leaves out special tokens and, for a stop string,
ends just before it.
"""

from __future__ import annotations

import atexit
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dsv3.engine.block_manager import BlockManager
from dsv3.engine.distributed import Link, agreed_num_blocks, prepare_runner_args
from dsv3.engine.config import EngineConfig, with_overrides
from dsv3.engine.model_runner import ModelRunner
from dsv3.engine.sampling import SamplingParams
from dsv3.engine.scheduler import Scheduler
from dsv3.engine.sequence import Sequence, TokenLogprob
from dsv3.model import Transformer
from dsv3.parallel import ParallelContext
from dsv3.model.fp8_linear import set_fp8_policy

Prompt = str | list[int]


@dataclass
class RequestOutput:
    """State of one request: all tokens so far, and what the latest step added."""

    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop" | "length" | "abort", None while running
    logprobs: list[TokenLogprob] | None
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (last admission)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class _Request:
    """Per-request text state: streaming decoder, text so far, how much was reported."""

    def __init__(self, seq: Sequence, tokenizer: Any) -> None:
        self.seq = seq
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True) if tokenizer is not None else None
        self.text = ""
        self.num_reported_tokens = 0
        self.num_reported_chars = 0
        self.stop_at: int | None = None  # text length at which a stop string begins


def _fast_applies(model: Transformer) -> bool:
    """The default of `LLM(fast=None)`: the model sits on CUDA (BF16 or FP8 weights alike)."""
    return model.embed_tokens.weight.is_cuda


class LLM:
    """DeepSeek-V3 inference with continuous batching over a paged MLA latent cache."""

    def __init__(self, model: str | Path | Transformer, tokenizer: Any = None, config: EngineConfig | None = None,
                 **overrides: Any) -> None:
        """`model`: a checkpoint folder or a loaded `Transformer` (used as is: its device and dtype).
        `tokenizer`: a `dsv3.tokenizer.Tokenizer`, a folder holding tokenizer.json, or None to use the
        model folder's (if any; without one only token-id prompts work and `.text` stays empty).
        `config`: an `EngineConfig` (device, dtype, cache size, batch limits, prefix caching, fast path);
        keyword `overrides` replace its fields (`LLM(path, device="cuda", num_blocks=64)`), and without
        a config they build one from the defaults.
        Cache size: `num_blocks` blocks of `block_size` tokens, else `cache_memory` bytes, else a
        default (80% of free GPU memory, 512 MiB on CPU).
        `fast`: the GPU kernels for every step (the Triton attention backend: SDPA prefill and the MLA decode
        kernel over the paged cache; fused MoE, norms and SwiGLU) and CUDA graphs for decode steps, captured
        here for decode batches up to `max_num_seqs` (`dsv3.engine.model_runner`). It readies the model in
        place (`dsv3.model.fused.fuse_for_inference`: stacked experts), so a `Transformer` passed in is
        changed. BF16/FP16/FP32 and FP8 weights (`FP8Linear`) alike; FP8 follows `fp8_policy`. None (default):
        on when the model is on CUDA, else off. True off CUDA raises ValueError.
        `speculative="mtp"`: the model's MTP module drafts `num_draft_tokens` tokens per sequence and step and
        the main model verifies them all in one forward (`dsv3.engine.speculative`); outputs keep the
        distribution of decoding without it (greedy: the same tokens). Acceptance per draft position is in
        `speculative_stats`."""
        config = with_overrides(config, overrides)
        self.config = config
        device, dtype = config.device, config.torch_dtype
        num_blocks, cache_memory, block_size = config.num_blocks, config.cache_memory, config.block_size
        max_num_seqs, max_num_batched_tokens = config.max_num_seqs, config.max_num_batched_tokens
        max_model_len, fast = config.max_model_len, config.fast
        if fast:  # before loading anything
            where = model.embed_tokens.weight.device if isinstance(model, Transformer) else torch.device(device)
            if where.type != "cuda":
                raise ValueError(f"fast=True needs a CUDA device, got {where}")
        folder: Path | None = None
        if isinstance(model, Transformer):
            self.model = model.eval()
        elif isinstance(model, (str, Path)):
            from dsv3.checkpoint import load_model
            folder = Path(model)
            self.model = load_model(folder, device=device, dtype=dtype, tp=config.tensor_parallel_size,
                                    ep=config.expert_parallel_size, moe=config.expert_exchange, weights=config.weights)
        else:
            raise ValueError(f"model must be a checkpoint folder or a Transformer, got {type(model).__name__}")
        if config.fp8_policy is not None:
            set_fp8_policy(self.model, config.fp8_policy)
        fast = prepare_runner_args(self.model, fast)  # split over ranks: see dsv3.engine.distributed
        if fast is None:
            fast = _fast_applies(self.model)
        self.tokenizer = self._load_tokenizer(tokenizer, folder)
        num_draft_tokens = config.num_draft_tokens if config.speculative == "mtp" else 0
        if num_draft_tokens and not len(self.model.mtp):
            raise ValueError("speculative='mtp' needs a model with an MTP module (num_nextn_predict_layers >= 1); "
                             "this checkpoint has none")
        self.runner = ModelRunner(self.model, block_size=block_size, num_blocks=num_blocks, cache_memory=cache_memory,
                                  fast=fast, max_num_seqs=max_num_seqs, num_draft_tokens=num_draft_tokens)
        self.parallel: ParallelContext = getattr(self.model, "parallel", None) or ParallelContext.single()
        if self.parallel.world > 1 and getattr(config, "speculative", None):
            raise ValueError("speculative decoding does not run on a model split over ranks yet")
        self.block_manager = BlockManager(agreed_num_blocks(self.parallel, self.runner.num_blocks), block_size,
                                          config.enable_prefix_caching)
        limit = min(self.model.args.max_seq_len, self.block_manager.capacity_tokens)
        if max_model_len is None:
            max_model_len = limit
        elif not 2 <= max_model_len <= limit:
            raise ValueError(f"max_model_len must be in [2, {limit}] (model max_seq_len and cache capacity), "
                             f"got {max_model_len}")
        self.max_model_len = max_model_len
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                                   eos_token_ids=self._eos_ids(), num_draft_tokens=num_draft_tokens)
        self._ids = itertools.count()
        self._requests: dict[int, _Request] = {}
        self._link = Link(self.parallel) if self.parallel.world > 1 else None
        if self._link is not None:
            atexit.register(self._close_at_exit)

    # ---- setup ------------------------------------------------------------------------------
    @staticmethod
    def _load_tokenizer(tokenizer: Any, folder: Path | None) -> Any:
        if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
            return tokenizer
        where = Path(tokenizer) if tokenizer is not None else folder
        if where is None or not (where / "tokenizer.json").is_file():
            if tokenizer is not None:
                raise FileNotFoundError(f"no tokenizer.json in {where}")
            return None
        from dsv3.tokenizer import load_tokenizer
        return load_tokenizer(where)

    def _eos_ids(self) -> list[int]:
        ids: set[int] = set()
        eos = self.model.args.eos_token_id
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(e) for e in eos)
        if self.tokenizer is not None and getattr(self.tokenizer, "eos_id", None) is not None:
            ids.add(int(self.tokenizer.eos_id))
        return sorted(ids)

    @property
    def eos_token_ids(self) -> list[int]:
        return sorted(self.scheduler.eos_token_ids)

    # ---- requests ---------------------------------------------------------------------------
    def _encode(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (no tokenizer.json found); pass token ids")
            return prompt, self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        vocab = self.model.args.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {bad[:5]}")
        return None, ids

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None) -> int:
        """Queue one prompt (text or token ids); returns its request id."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode text; use stop_token_ids")
        text, ids = self._encode(prompt)
        request_id = next(self._ids)
        seq = Sequence(request_id, ids, params, arrival=request_id, prompt=text)
        self.scheduler.add(seq)
        self._requests[request_id] = _Request(seq, self.tokenizer)
        return request_id

    def abort(self, request_id: int) -> bool:
        """Drop a request; True if it was still queued or running."""
        self._requests.pop(request_id, None)
        return self.scheduler.abort(request_id) is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_unfinished(self) -> int:
        return self.scheduler.num_unfinished

    # ---- one step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; return the requests that got new tokens or finished."""
        out = self.scheduler.schedule()
        if out.is_empty and not out.finished:
            if self.scheduler.has_unfinished():
                raise RuntimeError("the scheduler found nothing to run (a request cannot fit the cache)")
            return []
        if not self.is_driver:
            raise RuntimeError(f"rank {self.parallel.rank} follows rank 0: call run_worker() (or generate) there")
        if self._link is not None:
            self._link.step(out)  # every rank runs this step's forward
        sampled = self.runner.execute(out)
        self.scheduler.postprocess(out, sampled)
        touched = [item.seq for item in out.scheduled if item.sample] + out.finished
        outputs = []
        for seq in dict.fromkeys(touched):  # unique, in order
            req = self._requests.get(seq.seq_id)
            if req is None:
                continue
            self._update_text(req)
            outputs.append(self._report(req))
            if seq.is_finished:
                del self._requests[seq.seq_id]
        return outputs

    def _update_text(self, req: _Request) -> None:
        seq = req.seq
        if req.decoder is None:
            return
        new_ids = seq.output_token_ids[len(req.decoder.ids):]
        stops = seq.params.stop
        # with stop strings, several new tokens (speculative decoding keeps more than one per step) are decoded one
        # at a time, so the output ends at the token that completes a stop string, as with one token per step
        groups = [[t] for t in new_ids] if stops and req.stop_at is None and len(new_ids) > 1 else [new_ids]
        for i, ids in enumerate(groups):
            piece = req.decoder.extend(ids)
            if seq.is_finished and i == len(groups) - 1:
                piece += req.decoder.flush()
            before = len(req.text)
            req.text += piece
            if not (stops and req.stop_at is None and piece):
                continue
            longest = max(len(s) for s in stops)
            search_from = max(0, before - longest + 1)
            hits = [i for i in (req.text.find(s, search_from) for s in stops) if i >= 0]
            if hits:
                req.stop_at = min(hits)
                extra = len(groups) - 1 - i  # kept tokens after the one that completed the stop string
                if extra:
                    del seq.output_token_ids[-extra:]
                    if len(seq.output_logprobs) > seq.num_output_tokens:
                        del seq.output_logprobs[seq.num_output_tokens:]
                if not seq.is_finished:
                    self.scheduler.finish(seq, "stop")
                else:
                    seq.finish_reason = "stop"
                break
        if req.stop_at is not None:
            req.text = req.text[:req.stop_at]

    def _report(self, req: _Request) -> RequestOutput:
        seq = req.seq
        new_ids = seq.output_token_ids[req.num_reported_tokens:]
        shown = len(req.text)
        stops = seq.params.stop
        if stops and not seq.is_finished:  # hold back what could be the start of a stop string
            shown = max(req.num_reported_chars, shown - max(len(s) for s in stops) + 1)
        new_text = req.text[req.num_reported_chars:shown]
        req.num_reported_tokens = seq.num_output_tokens
        req.num_reported_chars = shown
        return RequestOutput(
            request_id=seq.seq_id, prompt=seq.prompt, prompt_token_ids=list(seq.prompt_token_ids),
            token_ids=list(seq.output_token_ids), text=req.text, finish_reason=seq.finish_reason,
            logprobs=list(seq.output_logprobs) if seq.params.logprobs is not None else None,
            new_token_ids=new_ids, new_text=new_text, num_cached_tokens=seq.num_cached_tokens)

    # ---- batch API --------------------------------------------------------------------------
    def generate(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs in prompt order.

        A single string, or a single list of ints, counts as one prompt. Under torchrun with a split model, every
        rank may call it: rank 0 returns the outputs, the others run the steps rank 0 announces and return []."""
        if not self.is_driver:
            self._link.follow(self.runner, until="idle")
            return []
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and
                                        all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params has {len(params)} entries for {len(prompts)} prompts")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        wanted = set(ids)
        results: dict[int, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm) as bar:
            while len(results) < len(ids):
                if not self.has_unfinished():
                    raise RuntimeError("requests were dropped before finishing")
                for output in self.step():
                    if output.finished and output.request_id in wanted:
                        results[output.request_id] = output
                        bar.update(1)
        if self._link is not None:
            self._link.idle()
        return [results[i] for i in ids]

    # ---- several ranks ----------------------------------------------------------------------
    @property
    def is_driver(self) -> bool:
        """True on rank 0 (or in one process): this rank schedules, samples and answers."""
        return self.parallel.is_driver

    def run_worker(self) -> None:
        """On ranks other than 0: run the steps rank 0 announces until rank 0's engine closes (servers, CLIs)."""
        if self.is_driver:
            raise RuntimeError("run_worker() is for ranks other than 0; rank 0 drives the engine")
        self._link.follow(self.runner, until="stop")

    def close(self) -> None:
        """A split model's engine is done: rank 0 tells the other ranks, which return from `run_worker` (a rank
        that called `generate` instead waits here for it). Every rank calls it, or it runs at exit; one process:
        nothing to do."""
        if self._link is not None:
            self._link.close(self.runner)

    def _close_at_exit(self) -> None:
        if torch.distributed.is_initialized():  # else the group is gone: nobody to tell
            try:
                self.close()
            except RuntimeError:
                pass  # a peer that already exited

    # ---- stats ------------------------------------------------------------------------------
    @property
    def prefix_cache_hit_tokens(self) -> int:
        return self.block_manager.prefix_hits

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    @property
    def speculative_stats(self) -> SpeculativeStats | None:
        """Drafts verified and accepted per draft position so far (None without speculative decoding)."""
        sched = self.scheduler
        if not sched.num_draft_tokens:
            return None
        return SpeculativeStats(list(sched.spec_drafted), list(sched.spec_accepted))


@dataclass
class SpeculativeStats:
    """Speculative decoding counters: `drafted[i]` drafts verified at draft position i (0: the token after the
    sequence's last one), `accepted[i]` of them kept."""

    drafted: list[int]
    accepted: list[int]

    @property
    def acceptance(self) -> list[float]:
        """Acceptance rate per draft position (0.0 where none was drafted)."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted, self.drafted)]

    @property
    def mean_accepted(self) -> float:
        """Accepted drafts per verify step (steps counted at position 0)."""
        return sum(self.accepted) / self.drafted[0] if self.drafted and self.drafted[0] else 0.0

    def summary(self) -> str:
        """One line: `acceptance per draft position 0.66, 0.41 (1.07 drafts kept per step)`."""
        rates = ", ".join(f"{r:.2f}" for r in self.acceptance)
        return f"acceptance per draft position {rates} ({self.mean_accepted:.2f} drafts kept per step)"
