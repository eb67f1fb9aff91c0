"""The model against `transformers` (the oracle), and its own paths against each other."""

import pytest
import torch

import dsv3
from dsv3.config import ModelArgs
from dsv3.model import Transformer
from hf_models import V2_LITE_TINY, make_v2, make_v3

CASES = {
    "v3": (make_v3, {}),
    "v2_lite_shape": (make_v3, V2_LITE_TINY),
    "v2_softmax_greedy": (make_v2, dict(topk_method="greedy", num_experts_per_tok=3)),
    "v2_softmax_group_limited": (make_v2, dict(topk_method="group_limited_greedy", num_experts_per_tok=3)),
}


def _tokens(vocab=256, seed=1):
    return torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers_fp32(case, tmp_path):
    make, overrides = CASES[case]
    hf = make(tmp_path, **overrides)
    ours = dsv3.load_model(tmp_path, dtype=torch.float32)
    tokens = _tokens()
    with torch.no_grad():
        expected = hf(tokens).logits
        for absorb in (True, False):
            diff = (ours(tokens, absorb=absorb) - expected).abs().max().item()
            assert diff <= 1e-4, f"{case} absorb={absorb}: max |logit diff| {diff}"


def test_group_limit_changes_routing(tmp_path):
    """The two softmax cases above must not be vacuous: group limiting picks different experts."""
    make_v2(tmp_path / "a", topk_method="greedy", num_experts_per_tok=3)
    make_v2(tmp_path / "b", topk_method="group_limited_greedy", num_experts_per_tok=3)
    a = dsv3.load_model(tmp_path / "a", dtype=torch.float32)
    b = dsv3.load_model(tmp_path / "b", dtype=torch.float32)
    with torch.no_grad():
        assert (a(_tokens()) - b(_tokens())).abs().max() > 1e-3


def test_bf16_difference_is_reported(tmp_path):
    """bf16 is not bit-comparable (near-tied experts flip); our bf16 error against the fp32 oracle must be
    of the same size as `transformers`' own bf16 error."""
    hf = make_v3(tmp_path)
    ours = dsv3.load_model(tmp_path, dtype=torch.bfloat16)
    tokens = _tokens()
    with torch.no_grad():
        expected = hf(tokens).logits
        ours_err = (ours(tokens).float() - expected).abs()
        hf_err = (hf.to(torch.bfloat16)(tokens).logits.float() - expected).abs()
    print(f"bf16 vs fp32 oracle: ours max {ours_err.max():.3f} mean {ours_err.mean():.4f}; "
          f"transformers bf16 max {hf_err.max():.3f} mean {hf_err.mean():.4f}")
    assert ours_err.mean() <= 3 * hf_err.mean()


def _tiny(**changes) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_preset("tiny").replace(**changes)).eval()
    with torch.no_grad():  # a bias large enough to change routing
        for block in model.blocks():
            if hasattr(block.mlp, "gate"):
                block.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("changes", [{}, dict(q_lora_rank=0, rope_interleave=False, rope_factor=1.0)])
def test_absorbed_equals_expanded(changes):
    model = _tiny(**changes)
    tokens = torch.randint(0, 512, (2, 48))
    with torch.no_grad():
        assert (model(tokens, absorb=True) - model(tokens, absorb=False)).abs().max() <= 1e-5


def _paged(model, kernels: bool, layers: int | None = None, slots: int = 256, block_size: int = 8):
    """A paged backend over a fresh cache of `layers` layers (default: the main ones), on the model's device."""
    from dsv3.engine.attention import PagedAttention, TritonPagedAttention

    args = model.args
    cache = torch.zeros(layers or args.n_layers, slots, args.kv_lora_rank + args.qk_rope_head_dim,
                        device=model.embed_tokens.weight.device)
    if kernels:
        return TritonPagedAttention(cache, block_size, args.max_seq_len, [b.self_attn for b in model.blocks()])
    return PagedAttention(cache, block_size, args.max_seq_len)


def _step(model, backend, tables, chunks, tokens):
    """One flat forward over `chunks` [(row, start, n)] of `tokens [B, T]` -> hidden `[N, D]`."""
    from dsv3.engine.attention import Chunk
    from dsv3.model.attention import AttentionMeta

    ids = torch.cat([tokens[r, s:s + n] for r, s, n in chunks])
    pos = torch.cat([torch.arange(s, s + n) for _, s, n in chunks]).to(tokens.device)
    step = backend.prepare([Chunk(tables[r], s, n) for r, s, n in chunks])
    return model.hidden(ids, pos, AttentionMeta(backend, step=step))


@pytest.mark.parametrize("kernels,device", [(False, "cpu"),  # the kernel backend on CPU: tests/test_cuda_graphs.py
                                            pytest.param(False, "cuda", marks=pytest.mark.gpu),
                                            pytest.param(True, "cuda", marks=pytest.mark.gpu)])
def test_paged_prefill_decode_and_mixed_steps_equal_the_full_forward(kernels, device):
    """The one forward over the paged cache (PyTorch reference backend, and on CUDA the kernel backend with the
    model fused for inference), float32: a batched prefill, mixed
    steps (one sequence decodes while the other prefills a chunk) and decode steps give the logits of
    `model(tokens)` (the reference modules, SDPA attention) at every position."""
    from dsv3.model.fused import fuse_for_inference

    model = _tiny().to(device)
    tokens = torch.randint(0, 512, (2, 40)).to(device)
    with torch.no_grad():
        full = model(tokens)
    if kernels:
        fuse_for_inference(model)
    backend = _paged(model, kernels)
    tables = [[3, 0, 7, 1, 9], [2, 5, 4, 8, 6]]  # scattered blocks of 8 slots
    got = {0: [], 1: []}
    with torch.no_grad():
        h = _step(model, backend, tables, [(0, 0, 17), (1, 0, 17)], tokens)  # one prefill group of two
        got[0].append(h[:17])
        got[1].append(h[17:])
        h = _step(model, backend, tables, [(0, 17, 1), (1, 17, 5)], tokens)  # mixed: a decode and a chunk
        got[0].append(h[:1])
        got[1].append(h[1:])
        h = _step(model, backend, tables, [(1, 22, 3), (0, 18, 1)], tokens)
        got[1].append(h[:3])
        got[0].append(h[3:])
        for pos in range(19, 40):  # decodes, one of them padded (the sequences are at different positions)
            chunks = [(0, pos, 1)] + ([(1, pos + 6, 1)] if pos + 6 < 40 else [])
            h = _step(model, backend, tables, chunks, tokens)
            got[0].append(h[:1])
            if len(chunks) > 1:
                got[1].append(h[1:])
        for row in (0, 1):
            logits = model.lm_head(torch.cat(got[row]))
            assert logits.shape == (40, 512)
            assert (logits - full[row]).abs().max() <= 1e-5


def test_mtp_training_logits_equal_incremental_drafting():
    """Depth-1 MTP logits from the training path equal the drafting path run token by token over a paged cache
    that holds the MTP module's latents after the main layers'."""
    from dsv3.engine.attention import Chunk
    from dsv3.model.attention import AttentionMeta

    model = _tiny()
    tokens = torch.randint(0, 512, (1, 24))
    backend = _paged(model, False, layers=model.args.n_layers + 1)
    table = [0, 1, 2, 3]
    with torch.no_grad():
        logits, (mtp,) = model(tokens, return_mtp=True)
        h = _step(model, backend, [table], [(0, 0, 24)], tokens)  # [24, D]
        assert mtp.shape == (1, 23, 512)
        steps = []
        for t in range(23):
            meta = AttentionMeta(backend, step=backend.prepare([Chunk(table, t, 1)]))
            steps.append(model.lm_head(model.mtp_hidden(0, tokens[0, t + 1:t + 2], h[t:t + 1], torch.tensor([t]), meta)))
    assert (torch.cat(steps) - mtp[0]).abs().max() <= 1e-5


def test_positions_beyond_max_seq_len_are_a_clear_error():
    model = _tiny(max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
