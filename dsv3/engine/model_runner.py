"""The model runner: owns the paged latent cache, the attention backend and the CUDA graphs, and runs one
scheduler step through the model's one forward (`Transformer.hidden`).

Cache layout: one tensor `[n_layers, num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]` in the
model dtype; per layer it is viewed as `[num_slots, C + R]` and a token at position p of a sequence lives in
slot `block_table[p // block_size] * block_size + p % block_size`. Only the MLA latents are cached (576
numbers per token per layer for DeepSeek-V3).

A step flattens the scheduled chunks of all sequences into one batch of N tokens with their positions, has
the backend build the step's attention tensors once (`dsv3.engine.attention`), runs the forward, then
computes logits only at the last token of the sequences that sample this step and samples on the device.

The backend is chosen once, here:
- `fast=False`: `PagedAttention`, plain PyTorch, the reference (CPU and GPU);
- `fast=True`: the model is readied for the GPU kernels (`dsv3.model.fused.fuse_for_inference`: stacked
  experts and the fused MoE, fused norms, SwiGLU and rope; in place, before the cache is sized) and
  `TritonPagedAttention` runs every step: prefill, decode and mixed. Steps where every sequence brings one
  token replay a CUDA graph of that same forward (`dsv3.engine.cuda_graphs`), captured for the decode batch
  sizes up to `max_num_seqs`.

Speculative decoding (`num_draft_tokens` k > 0, `dsv3.engine.speculative`): the cache gets the MTP modules'
layers after the main ones; a sequence that brings drafts runs its `1 + k` tokens as `1 + k` decode rows (each
its own position and context length, so the step stays decode-shaped: the same kernels, the CPU decode plan and
the CUDA graphs, captured for `B` and `B * (1 + k)` rows), logits come from every such row, and
`dsv3.engine.rejection.verify` decides what is kept. The MTP drafter then runs on the same step's hidden states
(on the fast path, all-greedy steps keep acceptance and drafting on the device: `MTPDrafter.propose_greedy`).
`execute` returns, per sampling sequence, the list of tokens it keeps.

A float32 model on the CPU (`fast=False`) also gets a `CPUDecodePlan` (`dsv3.engine.cpu_decode`), built once
here: its weights are re-stored for single-token products (same Parameters, same values) and decode-only steps
pass the plan in their `AttentionMeta`, so the forward's attention and FFN run from its packed weights.
"""

from __future__ import annotations


import torch

from dsv3.engine.attention import Chunk, PagedAttention, TritonPagedAttention
from dsv3.engine.cpu_decode import CPUDecodePlan
from dsv3.engine.cuda_graphs import DecodeGraphs, capture_sizes
from dsv3.engine.rejection import verify
from dsv3.engine.sampling import Sampler, SamplerOutput
from dsv3.engine.scheduler import ScheduledSeq, SchedulerOutput
from dsv3.engine.speculative import DraftJob, MTPDrafter
from dsv3.engine.sequence import Sequence, TokenLogprob
from dsv3.model import Transformer
from dsv3.model.attention import AttentionMeta
from dsv3.model.fused import fuse_for_inference

DEFAULT_CPU_CACHE_BYTES = 512 * 2**20


def _plain_greedy(params) -> bool:
    """Greedy on the raw logits, no log-probabilities: the kept tokens are argmaxes the device can pick alone."""
    return (params.greedy and not params.has_penalties and params.logprobs is None
            and not getattr(params, "logit_bias", None) and getattr(params, "grammar", None) is None)
DEFAULT_GPU_MEMORY_FRACTION = 0.8  # of the free memory after loading the model


def cache_bytes_per_block(model: Transformer, block_size: int, dtype: torch.dtype | None = None,
                          mtp_layers: int = 0) -> int:
    """Bytes of one cache block: `block_size` tokens x layers (main + `mtp_layers`) x (kv_lora_rank + rope dim)."""
    args = model.args
    dtype = dtype or model.embed_tokens.weight.dtype
    elem = torch.empty((), dtype=dtype).element_size()
    return block_size * (args.n_layers + mtp_layers) * (args.kv_lora_rank + args.qk_rope_head_dim) * elem


class ModelRunner:
    """Paged latent cache + one forward per scheduler step + sampling."""

    def __init__(self, model: Transformer, block_size: int = 16, num_blocks: int | None = None,
                 cache_memory: int | None = None, fast: bool = False, max_num_seqs: int = 64,
                 cuda_graphs: bool | None = None, num_draft_tokens: int = 0) -> None:
        """`fast`: the GPU kernels for every step (see the module docstring); `max_num_seqs`: the largest
        decode batch, whose graph is captured. `cuda_graphs` (default: `fast` on CUDA) captures the decode
        steps; `fast=True` without graphs also runs on CPU, with the kernels' PyTorch references.
        `num_draft_tokens` k > 0: MTP speculative decoding with k drafts per sequence and step."""
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.model = model
        self.args = model.args
        self.block_size = block_size
        weight = model.embed_tokens.weight
        self.device = weight.device
        self.dtype = weight.dtype
        if cuda_graphs is None:
            cuda_graphs = fast and self.device.type == "cuda"
        if cuda_graphs and (not fast or self.device.type != "cuda"):
            raise ValueError(f"CUDA graphs need fast=True and a CUDA device, got fast={fast} on {self.device}")
        if num_draft_tokens < 0:
            raise ValueError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}")
        if num_draft_tokens and not len(model.mtp):
            raise ValueError("speculative decoding needs a model with an MTP module (num_nextn_predict_layers >= 1)")
        self.num_draft_tokens = num_draft_tokens
        mtp_layers = min(num_draft_tokens, len(model.mtp))  # the modules the drafts run through
        if fast:
            capture_sizes(max_num_seqs)  # checks max_num_seqs before any work
            fuse_for_inference(model)  # stacking the experts needs memory the cache would otherwise take
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.plan = None  # the CPU decode plan, for float32 CPU models
        if not fast and self.device.type == "cpu" and CPUDecodePlan.supports(model):
            self.plan = CPUDecodePlan(model)
        per_block = cache_bytes_per_block(model, block_size, self.dtype, mtp_layers)
        if num_blocks is None:
            if cache_memory is None:
                cache_memory = self._default_cache_memory()
            if cache_memory < per_block:
                raise ValueError(f"cache_memory ({cache_memory} bytes) is below one block ({per_block} bytes)")
            num_blocks = cache_memory // per_block
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = int(num_blocks)
        latent = self.args.kv_lora_rank + self.args.qk_rope_head_dim
        n_cached = self.args.n_layers + mtp_layers
        self.kv_cache = torch.zeros(n_cached, self.num_blocks, block_size, latent,
                                    device=self.device, dtype=self.dtype)  # [L (+ MTP), blocks, block_size, C + R]
        layers = self.kv_cache.view(n_cached, -1, latent)  # [L, slots, C + R]
        if fast:
            self.backend: PagedAttention = TritonPagedAttention(layers, block_size, self.args.max_seq_len,
                                                                [b.self_attn for b in model.blocks()[:n_cached]])
        else:
            self.backend = PagedAttention(layers, block_size, self.args.max_seq_len)
        self.drafter = MTPDrafter(model, self.backend, num_draft_tokens, block_size) if num_draft_tokens else None
        self.sampler = Sampler()
        self.graphs: DecodeGraphs | None = None
        self.graph_steps = 0  # steps replayed from a CUDA graph
        limit = min(self.args.max_seq_len, self.num_blocks * block_size)  # widest block table a sequence needs
        max_blocks = -(-limit // block_size)
        sizes = capture_sizes(max_num_seqs)
        sizes = sorted(set(sizes) | {b * (1 + num_draft_tokens) for b in sizes})  # verify steps: 1 + k rows each
        if fast and self.drafter is not None:  # MTP steps on device tensors (captured below with cuda_graphs)
            for m in self.drafter.modules_used:
                self.drafter.graphs[m] = DecodeGraphs(model, self.backend, max_blocks, batch_sizes=sizes, mtp=m)
            self.drafter.fused = True
        if cuda_graphs:
            self.graphs = DecodeGraphs(model, self.backend, max_blocks=max_blocks, batch_sizes=sizes)
            with torch.cuda.device(self.device):  # the capture streams belong to the model's GPU
                self.graphs.capture()
                for graphs in self.drafter.graphs.values() if self.drafter is not None else ():
                    graphs.capture()

    def _default_cache_memory(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * DEFAULT_GPU_MEMORY_FRACTION)
        return DEFAULT_CPU_CACHE_BYTES

    @property
    def cache_bytes(self) -> int:
        return self.kv_cache.numel() * self.kv_cache.element_size()

    # ---- one step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list:
        """Run the scheduled chunks; return, for each sequence that samples (in `out.scheduled` order), its
        `(token, logprob)`, or with speculative decoding the list of `(token, logprob)` it keeps (accepted
        drafts, then the step's own token)."""
        if out.is_empty:
            return []
        items = out.scheduled
        tokens, positions, chunks, starts, sample_rows = self._flatten(items)
        greedy_fused = self.drafter is not None and self.drafter.fused and all(
            _plain_greedy(item.seq.params) for item in items if item.sample)
        inputs = None
        if self.graphs is not None or greedy_fused:
            inputs = self._pack(tokens, positions, chunks, self.graphs.max_blocks if self.graphs is not None else None)
        replayed = self._replay(inputs) if self.graphs is not None else None
        dev = self.device
        if replayed is not None:  # every row one token: a captured graph
            logits, h = replayed  # [N, V], [N, D]
            if len(sample_rows) < len(tokens):
                logits = logits[torch.tensor(sample_rows, dtype=torch.long, device=dev)]
        else:
            if max(positions) >= self.args.max_seq_len:
                raise ValueError(f"position {max(positions)} is beyond max_seq_len ({self.args.max_seq_len})")
            step = self.backend.prepare(chunks)
            plan = self.plan if step.num_decodes == len(tokens) else None  # decode-only steps
            h = self.model.hidden(torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev),
                                  AttentionMeta(self.backend, step=step, plan=plan))  # [N, D]
            logits = None
            if sample_rows:
                rows = torch.tensor(sample_rows, device=dev) if len(sample_rows) < len(tokens) else None
                logits = self.model.lm_head(h if rows is None else h[rows])  # [M, V]
        sampling = [item for item in items if item.sample]
        if self.drafter is None:
            if not sampling:
                return []
            seqs = [item.seq for item in sampling]
            return self._to_python(self.sample(logits.float(), seqs), seqs)
        if greedy_fused and sampling:
            return self.drafter.propose_greedy(items, starts, tokens, chunks, sample_rows, logits, h, inputs)
        kept = self._verify(logits.float(), sampling) if sampling else []
        self.drafter.propose(self._draft_jobs(items, starts, kept), h)
        return self._kept_with_logprobs(logits, sampling, kept)

    def _verify(self, logits: torch.Tensor, sampling: list[ScheduledSeq]) -> list[list[int]]:
        """Kept tokens per sampling sequence: `rejection.verify`, and the plain sampler for grammar requests
        (they bring no drafts: one row each)."""
        seqs = [item.seq for item in sampling]
        grammar = [b for b, s in enumerate(seqs) if getattr(s.params, "grammar", None) is not None]
        if not grammar:
            return verify(logits, [s.params for s in seqs], [s.output_token_ids for s in seqs],
                          [item.drafts for item in sampling], self._generators(seqs),
                          [s.prompt_token_ids for s in seqs])
        offsets = [0]
        for item in sampling:
            offsets.append(offsets[-1] + len(item.drafts) + 1)
        rest = [b for b in range(len(seqs)) if b not in set(grammar)]
        kept: list[list[int]] = [[] for _ in seqs]
        dev = logits.device
        rows = torch.tensor([offsets[b] for b in grammar], device=dev)
        sampled = self.sample(logits[rows], [seqs[b] for b in grammar]).token_ids.tolist()
        for b, t in zip(grammar, sampled):
            kept[b] = [t]
        if rest:
            rows = torch.tensor([r for b in rest for r in range(offsets[b], offsets[b + 1])], device=dev)
            part = verify(logits[rows], [seqs[b].params for b in rest], [seqs[b].output_token_ids for b in rest],
                          [sampling[b].drafts for b in rest], self._generators([seqs[b] for b in rest]),
                          [seqs[b].prompt_token_ids for b in rest])
            for b, keep in zip(rest, part):
                kept[b] = keep
        return kept

    def _flatten(self, items: list[ScheduledSeq]) -> tuple[list[int], list[int], list[Chunk], list[int], list[int]]:
        """The step's flat rows: tokens, positions, attention chunks, each item's first row, the rows to sample.
        Decodes and verified drafts are one-token chunks (decode rows); prefill chunks stay whole."""
        tokens: list[int] = []
        positions: list[int] = []
        chunks: list[Chunk] = []
        starts: list[int] = []
        sample_rows: list[int] = []
        for item in items:
            seq, start, n = item.seq, item.start, item.num_tokens
            row = len(tokens)
            starts.append(row)
            tokens += seq.token_slice(start, start + n - len(item.drafts)) + item.drafts
            positions += range(start, start + n)
            if n == 1 or item.drafts:
                chunks += [Chunk(seq.block_table, p, 1) for p in range(start, start + n)]
            else:
                chunks.append(Chunk(seq.block_table, start, n))
            if item.sample:
                sample_rows += range(row, row + n) if item.drafts else [row + n - 1]
        return tokens, positions, chunks, starts, sample_rows

    def _pack(self, tokens: list[int], positions: list[int], chunks: list[Chunk],
              max_blocks: int | None = None) -> tuple[torch.Tensor, ...] | None:
        """Device inputs of a step whose rows are all one-token chunks: tokens, positions, slots `[N]`, block tables
        `[N, W]` int32 and context lengths `[N]` int32, in one host-to-device copy; None for any other step (or
        a table wider than `max_blocks`)."""
        if len(chunks) != len(tokens):
            return None
        bs = self.block_size
        slots: list[int] = []
        tables: list[list[int]] = []
        for chunk in chunks:
            pos = chunk.start
            table = chunk.block_table[: pos // bs + 1]  # the blocks holding positions 0..pos
            if len(table) * bs <= pos:
                raise RuntimeError(f"a sequence has {len(chunk.block_table)} blocks for {pos + 1} tokens")
            slots.append(table[-1] * bs + pos % bs)
            tables.append(table)
        width = max(len(table) for table in tables)
        if max_blocks is not None and width > max_blocks:
            return None
        n = len(chunks)
        flat = tokens + positions + slots
        for table in tables:
            flat += table + [0] * (width - len(table))
        packed = torch.tensor(flat, dtype=torch.long).to(self.device, non_blocking=True)  # one copy to the device
        tok, pos, slot = packed[: 3 * n].view(3, n)  # 3 x [N]
        return tok, pos, slot, packed[3 * n:].view(n, width).to(torch.int32), (pos + 1).to(torch.int32)

    def _replay(self, inputs: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(logits `[N, vocab]`, hidden `[N, D]`) of a decode-shaped step (`_pack`'s inputs) from a CUDA graph;
        None for any other step. Views of a graph's static outputs: valid until the next replay."""
        if inputs is None or inputs[0].shape[0] > self.graphs.sizes[-1]:
            return None
        logits, _, h = self.graphs.run(*inputs, hidden=True)
        self.graph_steps += 1
        return logits, h

    def _draft_jobs(self, items: list[ScheduledSeq], starts: list[int], kept: list[list[int]]) -> list[DraftJob]:
        """What the MTP module catches up on: every position of the step whose main hidden state is kept, with
        the token after it (the prompt's next token, a kept draft, or the step's new token)."""
        jobs = []
        keeps = iter(kept)
        for item, row in zip(items, starts):
            seq, start = item.seq, item.start
            n = item.num_tokens - len(item.drafts)  # the sequence's own tokens in the chunk
            if item.sample:
                keep = next(keeps)
                after = seq.token_slice(start + 1, start + n) + keep
            else:
                after = seq.token_slice(start + 1, start + n + 1)
            jobs.append(DraftJob(seq, start, list(range(row, row + len(after))), after,
                                 single=item.num_tokens == 1 or bool(item.drafts), draft=item.sample))
        return jobs

    def _kept_with_logprobs(self, logits: torch.Tensor | None, sampling: list[ScheduledSeq],
                            kept: list[list[int]]) -> list[list[tuple[int, TokenLogprob | None]]]:
        """Kept tokens as `(token, logprob)`; a kept token's log-probability is the raw one of the row that
        chose it (the row after the tokens before it), as without speculation."""
        wanted = [item.seq.params.logprobs for item in sampling if item.seq.params.logprobs is not None]
        if not wanted:
            return [[(t, None) for t in keep] for keep in kept]
        raw = logits.float().log_softmax(dim=-1)  # [M, V]
        top_lp, top_ids = raw.topk(min(max(wanted), raw.shape[1]), dim=-1) if max(wanted) else (None, None)
        out = []
        row = 0
        for item, keep in zip(sampling, kept):
            k = item.seq.params.logprobs
            if k is None:
                out.append([(t, None) for t in keep])
            else:
                rows = torch.arange(row, row + len(keep), device=raw.device)
                chosen = raw[rows, torch.tensor(keep, device=raw.device)].tolist()
                ids = top_ids[rows, :k].tolist() if k else [[] for _ in keep]
                lps = top_lp[rows, :k].tolist() if k else [[] for _ in keep]
                out.append([(t, TokenLogprob(t, c, list(zip(i, lp)))) for t, c, i, lp in zip(keep, chosen, ids, lps)])
            row += len(item.drafts) + 1
        return out

    def _generators(self, seqs: list[Sequence]) -> list[torch.Generator | None]:
        """Each sequence's own random stream (seeded requests), made on first use."""
        for seq in seqs:
            if seq.params.seed is not None and seq.generator is None:
                seq.generator = torch.Generator(device=self.device).manual_seed(seq.params.seed)
        return [seq.generator for seq in seqs]

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        return self.sampler(logits, [s.params for s in seqs], [s.output_token_ids for s in seqs],
                            self._generators(seqs), prompt_token_ids=[s.prompt_token_ids for s in seqs])

    @staticmethod
    def _to_python(result: SamplerOutput, seqs: list[Sequence]) -> list[tuple[int, TokenLogprob | None]]:
        tokens = result.token_ids.tolist()  # the one host sync of a step
        if result.logprobs is None:
            return [(t, None) for t in tokens]
        chosen = result.logprobs.tolist()
        top_ids = result.top_ids.tolist() if result.top_ids is not None else None
        top_lp = result.top_logprobs.tolist() if result.top_logprobs is not None else None
        out = []
        for b, (seq, t) in enumerate(zip(seqs, tokens)):
            k = seq.params.logprobs
            if k is None:
                out.append((t, None))
                continue
            top = list(zip(top_ids[b][:k], top_lp[b][:k])) if k and top_ids is not None else []
            out.append((t, TokenLogprob(t, chosen[b], top)))
        return out
