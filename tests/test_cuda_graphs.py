"""Decode steps captured in CUDA graphs (`dsv3.engine.cuda_graphs.DecodeGraphs`) over the Triton paged backend,
and the model readied for the GPU kernels (`dsv3.model.fused.fuse_for_inference`).

CPU: the captured batch sizes and padding, argument checks, and `fuse_for_inference` keeping the reference
forward and the state dict. `triton` (the GPU, or the CPU under Triton's interpreter): one mixed step (decodes,
a fresh prompt, a prompt chunk on top of its cache) and a decode step through `DecodeGraphs.run` over
`TritonPagedAttention` equal the full forward `model(tokens)`. GPU (`gpu` marker):
- graph replays equal the eager forward over the same backend for batch sizes 1, 3 (padded to 4), 5 (padded
  to 8) and 8, in float32 and bfloat16, write the same latents, and leave the cache outside the step's slots
  untouched (padding rows are inert);
- greedy tokens of graph-replayed decode equal those of the plain PyTorch model (`model(tokens)`, the full
  forward over each whole sequence) in float32, with prompts of different lengths and a padded batch;
- `LLM(fast=True)` (Triton backend for every step, graphs for decode steps) equals `LLM(fast=False)` (the
  PyTorch paged backend) and the full forward token for token in float32, with prompts chunked so that
  prefill-only, mixed and decode-only steps all occur.
"""

import copy

import pytest
import torch

from dsv3.config import ModelArgs
from dsv3.engine import LLM, SamplingParams
from dsv3.engine.attention import Chunk, TritonPagedAttention
from dsv3.engine.cuda_graphs import DecodeGraphs, capture_sizes, padded_size
from dsv3.model import Transformer
from dsv3.model.attention import AttentionMeta
from dsv3.model.fused import StackedExperts, fuse_for_inference

PAGE = 4


def _model(dtype: str = "float32", seed: int = 0, **changes) -> Transformer:
    args = ModelArgs.from_preset("tiny").replace(dtype=dtype, **changes)
    torch.manual_seed(seed)
    model = Transformer(args).eval()
    with torch.no_grad():  # well-separated logits: greedy choices are not near-ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
        for layer in model.layers[args.n_dense_layers:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


def _backend(model: Transformer, num_blocks: int) -> TritonPagedAttention:
    """The Triton paged backend over a fresh cache `[layers, num_blocks * PAGE, C + R]` on the model's device."""
    a = model.args
    weight = model.embed_tokens.weight
    cache = torch.zeros(a.n_layers, num_blocks * PAGE, a.kv_lora_rank + a.qk_rope_head_dim, device=weight.device,
                        dtype=weight.dtype)
    return TritonPagedAttention(cache, PAGE, a.max_seq_len, [b.self_attn for b in model.layers])


def _tables(n: int, per_seq: int, num_blocks: int, seed: int = 0) -> list[list[int]]:
    """`n` disjoint block tables of `per_seq` blocks, drawn at random from `num_blocks`."""
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))[: n * per_seq]
    return perm.view(n, per_seq).tolist()


def _prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def _eager_step(model: Transformer, backend: TritonPagedAttention, chunks: list[Chunk],
                tokens: list[list[int]]) -> torch.Tensor:
    """One step of the engine's eager path: `tokens[i]` are chunk i's tokens -> logits `[N, vocab]` of every
    flat token."""
    device = model.embed_tokens.weight.device
    step = backend.prepare(chunks)
    flat = torch.tensor([t for toks in tokens for t in toks], device=device)
    positions = torch.tensor([p for c in chunks for p in range(c.start, c.start + c.num_tokens)], device=device)
    return model.lm_head(model.hidden(flat, positions, AttentionMeta(backend, step=step)))


def _decode_inputs(tables: list[list[int]], positions: list[int], device) -> tuple[torch.Tensor, ...]:
    """`DecodeGraphs.run`'s positions, slots, block tables (zero-padded to the widest) and lengths."""
    width = max(p // PAGE + 1 for p in positions)
    rows = [t[: p // PAGE + 1] + [0] * (width - p // PAGE - 1) for t, p in zip(tables, positions)]
    slots = [t[p // PAGE] * PAGE + p % PAGE for t, p in zip(tables, positions)]
    pos = torch.tensor(positions, device=device)
    return (pos, torch.tensor(slots, device=device), torch.tensor(rows, dtype=torch.int32, device=device),
            (pos + 1).int())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


@torch.no_grad()
def _full_forward_logits(ref: Transformer, seq: list[int]) -> torch.Tensor:
    """The plain PyTorch path: `model(tokens [1, T])` -> logits `[T, vocab]`."""
    return ref(torch.tensor([seq], device=ref.embed_tokens.weight.device))[0]


# ---- CPU ---------------------------------------------------------------------------------------------
def test_padded_size():
    sizes = [1, 2, 4, 8, 32]
    assert [padded_size(b, sizes) for b in (1, 2, 3, 5, 8, 9, 32)] == [1, 2, 4, 8, 8, 32, 32]
    assert padded_size(33, sizes) is None
    with pytest.raises(ValueError, match="batch"):
        padded_size(0, sizes)


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert capture_sizes(200) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 200]
    with pytest.raises(ValueError, match="max_num_seqs"):
        capture_sizes(0)


def test_graphs_check_their_arguments_and_refuse_cpu():
    model = fuse_for_inference(_model())
    backend = _backend(model, 8)
    with pytest.raises(ValueError, match="max_blocks"):
        DecodeGraphs(model, backend, max_blocks=0)
    with pytest.raises(ValueError, match="batch_sizes"):
        DecodeGraphs(model, backend, max_blocks=2, batch_sizes=[])
    with pytest.raises(ValueError, match="batch_sizes"):
        DecodeGraphs(model, backend, max_blocks=2, batch_sizes=[0, 2])
    graphs = DecodeGraphs(model, backend, max_blocks=2, batch_sizes=[4, 1, 2, 2])
    assert graphs.sizes == [1, 2, 4] and graphs.tokens.shape == (4,) and graphs.block_tables.shape == (4, 2)
    with pytest.raises(ValueError, match="CUDA"):
        graphs.capture()
    one = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="block_tables"):  # wider than captured
        graphs.run(one, one, one, torch.zeros(1, 3, dtype=torch.int32), one.int() + 1)


def test_fuse_for_inference_keeps_the_reference_forward_and_state_dict():
    """Off CUDA every fused module runs its PyTorch form: the same logits, names and tensors as before."""
    model = _model()
    tokens = torch.randint(0, model.args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, expected_mtp = model(tokens, return_mtp=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert fuse_for_inference(model) is model
    moes = [m for m in model.modules() if getattr(m, "stacked", None) is not None]
    assert len(moes) == model.args.n_layers - model.args.n_dense_layers + model.args.num_nextn_predict_layers
    for moe in moes:
        stacked = moe.stacked
        assert isinstance(stacked, StackedExperts)
        a = model.args
        shared = stacked.n_shared_slices
        assert shared == a.n_shared_experts
        assert stacked.w_gate.shape == (a.n_routed_experts + shared, a.moe_inter_dim, a.dim)
        assert stacked.w_down.shape == (a.n_routed_experts + shared, a.dim, a.moe_inter_dim)
        assert stacked.active_experts.shape == (1,)
        for e, expert in enumerate(moe.experts):  # the experts' weights are views into the stacks: no copy
            assert expert.gate_proj.weight.data_ptr() == stacked.w_gate[e].data_ptr()
            assert expert.down_proj.weight.data_ptr() == stacked.w_down[e].data_ptr()
        torch.testing.assert_close(stacked.w_up[a.n_routed_experts:].flatten(0, 1), moe.shared_experts.up_proj.weight)
    assert model.norm.fused and model.layers[0].mlp.fused and model.layers[0].self_attn.fused
    assert not any(p.requires_grad for p in model.parameters())
    after = model.state_dict()
    assert list(after) == list(before)  # the stacks are not in the state dict
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    with torch.no_grad():
        got, got_mtp = model(tokens, return_mtp=True)
    assert torch.equal(got, expected)
    for g, e in zip(got_mtp, expected_mtp):
        assert torch.equal(g, e)
    stacks = [m.stacked for m in moes]
    fuse_for_inference(model)  # a second call changes nothing
    assert [m.stacked for m in moes] == stacks


@pytest.mark.triton
def test_mixed_step_and_decode_step_equal_the_full_forward(triton_device):
    """One eager step holding a decode, a fresh prompt and a prompt chunk on top of its cache; then one decode
    step through `DecodeGraphs.run` (replayed on a GPU, eager on a CPU): every row equals the full forward."""
    device = triton_device
    ref = _model().to(device)
    model = fuse_for_inference(copy.deepcopy(ref))
    backend = _backend(model, 24)
    tables = _tables(3, 8, 24, seed=1)
    seqs = _prompts([7, 5, 11], model.args.vocab_size, seed=2)
    # step 1: sequence 0 whole (7 tokens), sequence 2 its first 6 tokens
    _eager_step(model, backend, [Chunk(tables[0], 0, 7), Chunk(tables[2], 0, 6)], [seqs[0], seqs[2][:6]])
    # step 2 (mixed): sequence 0 decodes its 8th token, sequence 1 whole (5), sequence 2 tokens 6..10
    seqs[0].append(17)
    chunks = [Chunk(tables[0], 7, 1), Chunk(tables[1], 0, 5), Chunk(tables[2], 6, 5)]
    logits = _eager_step(model, backend, chunks, [seqs[0][7:], seqs[1], seqs[2][6:]])
    expected = torch.cat([_full_forward_logits(ref, seqs[0])[7:], _full_forward_logits(ref, seqs[1]),
                          _full_forward_logits(ref, seqs[2])[6:]])
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    # step 3: all three decode one token (batch 3; on a GPU replayed padded to 4)
    graphs = DecodeGraphs(model, backend, max_blocks=8, batch_sizes=[1, 4])
    if device == "cuda":
        graphs.capture()
    new = [5, 300, 41]
    for s, t in zip(seqs, new):
        s.append(t)
    positions = [len(s) - 1 for s in seqs]
    logits, greedy = graphs.run(torch.tensor(new, device=device), *_decode_inputs(tables, positions, device))
    expected = torch.stack([_full_forward_logits(ref, s)[-1] for s in seqs])
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(greedy, logits.argmax(-1))


# ---- GPU ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_replay_equals_the_eager_step_and_padding_is_inert(dtype):
    model = fuse_for_inference(_model(dtype).cuda())
    backend = _backend(model, 64)
    graphs = DecodeGraphs(model, backend, max_blocks=8, batch_sizes=[1, 2, 4, 8])
    graphs.capture()
    assert sorted(graphs.graphs) == [1, 2, 4, 8]
    assert backend.cache.abs().sum() == 0  # capture wrote nothing
    lengths = [5, 9, 17, 3, 28, 12, 20, 7]  # contexts of 8 sequences, up to 7 of their 8 blocks
    tables = _tables(8, 8, 64, seed=3)
    prompts = _prompts(lengths, model.args.vocab_size, seed=4)
    _eager_step(model, backend, [Chunk(t, 0, n) for t, n in zip(tables, lengths)], prompts)
    cache = backend.cache
    before = cache.clone()
    tol = 1e-4 if dtype == "float32" else 3e-2
    g = torch.Generator().manual_seed(5)
    for b in (1, 3, 5, 8):  # 3 and 5 replay the graphs of 4 and 8 with inert padding rows
        tokens = torch.randint(3, model.args.vocab_size, (b,), generator=g)
        inputs = _decode_inputs(tables[:b], lengths[:b], "cuda")
        logits, greedy = graphs.run(tokens.cuda(), *inputs)
        logits, greedy = logits.clone(), greedy.clone()
        replayed = cache.clone()
        cache.copy_(before)
        eager = _eager_step(model, backend, [Chunk(t, n, 1) for t, n in zip(tables[:b], lengths[:b])],
                            [[t] for t in tokens.tolist()])
        written = cache.clone()
        cache.copy_(before)
        assert logits.shape == eager.shape == (b, model.args.vocab_size)
        assert _rel(logits, eager) < tol, f"batch {b}"
        assert torch.equal(greedy, logits.argmax(-1))
        slots = inputs[1]
        untouched = torch.ones(cache.shape[1], dtype=torch.bool, device="cuda")
        untouched[slots] = False
        assert torch.equal(replayed[:, untouched], before[:, untouched]), f"batch {b}: a padding row wrote"
        assert _rel(replayed[:, slots], written[:, slots]) < tol, f"batch {b}"


@pytest.mark.gpu
def test_graph_greedy_decode_equals_the_full_forward_fp32():
    ref = _model().cuda()
    model = fuse_for_inference(copy.deepcopy(ref))
    lengths, steps = [8, 3, 13], 24
    per_seq = -(-(max(lengths) + steps) // PAGE)
    backend = _backend(model, 3 * per_seq)
    graphs = DecodeGraphs(model, backend, max_blocks=per_seq, batch_sizes=[1, 2, 4])
    graphs.capture()
    tables = _tables(3, per_seq, 3 * per_seq, seed=6)
    seqs = _prompts(lengths, model.args.vocab_size, seed=7)
    logits = _eager_step(model, backend, [Chunk(t, 0, n) for t, n in zip(tables, lengths)], seqs)
    last = torch.tensor(lengths, device="cuda").cumsum(0) - 1
    step_logits = [logits[last]]  # [3, V] per step
    tokens = logits[last].argmax(-1)
    for s, t in zip(seqs, tokens.tolist()):
        s.append(t)
    for _ in range(steps - 1):  # batch 3: the graph of 4 with one inert row
        logits, tokens = graphs.run(tokens, *_decode_inputs(tables, [len(s) - 1 for s in seqs], "cuda"))
        step_logits.append(logits.clone())
        for s, t in zip(seqs, tokens.tolist()):
            s.append(t)
    for i, (prompt_len, seq) in enumerate(zip(lengths, seqs)):
        full = _full_forward_logits(ref, seq)  # [T, V]
        expected = full[prompt_len - 1:-1].argmax(-1).tolist()
        assert seq[prompt_len:] == expected, f"sequence {i}"
        got = torch.stack([s[i] for s in step_logits])
        torch.testing.assert_close(got, full[prompt_len - 1:-1], atol=1e-3, rtol=1e-3)


def _record_kinds(runner) -> list[str]:
    """Spy on `runner.execute`: the kind of each step, "prefill" (every chunk longer than one token),
    "decode" (every chunk one token) or "mixed"."""
    real = runner.execute
    kinds: list[str] = []

    def execute(out):
        sizes = [item.num_tokens for item in out.scheduled]
        if sizes:
            kinds.append("decode" if max(sizes) == 1 else "prefill" if min(sizes) > 1 else "mixed")
        return real(out)

    runner.execute = execute
    return kinds


@pytest.mark.gpu
def test_fast_engine_equals_pytorch_engine_fp32_with_prefill_mixed_and_decode_steps():
    ref = _model().cuda()
    settings = dict(num_blocks=64, block_size=PAGE, max_num_seqs=6, max_num_batched_tokens=10)
    slow = LLM(copy.deepcopy(ref), fast=False, **settings)
    fast = LLM(copy.deepcopy(ref), fast=True, **settings)
    assert slow.runner.graphs is None and not slow.runner.backend.kernels
    assert fast.runner.backend.kernels and sorted(fast.runner.graphs.graphs) == [1, 2, 4, 6]
    kinds = _record_kinds(fast.runner)
    # two equal prompts share a prefill group; the 13- and 22-token prompts are chunked (later chunks attend over
    # their cache); the 1-token prompt samples from a one-token prefill; the batch shrinks as requests finish
    prompts = _prompts([5, 5, 13, 22, 1, 9], ref.args.vocab_size, seed=8)
    max_tokens = [10, 4, 12, 7, 9, 3]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    expected = slow.generate(prompts, params, use_tqdm=False)
    got = fast.generate(prompts, params, use_tqdm=False)
    for prompt, n, s, f in zip(prompts, max_tokens, expected, got):
        assert f.token_ids == s.token_ids, f"prompt of {len(prompt)} tokens"
        assert len(f.token_ids) == n
        full = _full_forward_logits(ref, prompt + f.token_ids)
        assert f.token_ids == full[len(prompt) - 1:-1].argmax(-1).tolist(), f"prompt of {len(prompt)} tokens"
    assert {"prefill", "mixed", "decode"} <= set(kinds), kinds
    assert fast.runner.graph_steps > 0 and fast.runner.graph_steps == kinds.count("decode")
    assert fast.block_manager.num_free_blocks == 64
