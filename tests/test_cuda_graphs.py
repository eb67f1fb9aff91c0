"""The fast decode step and its CUDA graphs: the step against the model's own cached forward (CPU), the
GPU path (fused kernels + paged cache + graphs) against the CPU reference (greedy, 64 steps, fp32)."""

import copy

import pytest
import torch

from dsv3.config import ModelArgs
from dsv3.engine.cuda_graphs import DecodeGraphs, PrefillGraphs, padded_size
from dsv3.model import Transformer
from dsv3.model.fast import FastDecoder, FusedMLP, FusedMoE, FusedRMSNorm, prepare_fast, slots_for

PAGE = 4


def _model(dtype: str = "float32", seed: int = 0, **changes) -> Transformer:
    args = ModelArgs.from_preset("tiny").replace(dtype=dtype, **changes)
    torch.manual_seed(seed)
    model = Transformer(args).eval()
    with torch.no_grad():  # well-separated logits: greedy choices are not near-ties
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
        for layer in model.layers[args.n_dense_layers:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


def _cache(model: Transformer, num_blocks: int, device="cpu") -> torch.Tensor:
    a = model.args
    return torch.zeros(a.n_layers, num_blocks, PAGE, a.kv_lora_rank + a.qk_rope_head_dim, device=device,
                       dtype=model.embed_tokens.weight.dtype)


def _tables(batch: int, per_seq: int, num_blocks: int, device="cpu", seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_blocks, generator=g)[: batch * per_seq].view(batch, per_seq).int().to(device)


@torch.no_grad()
def _reference_greedy(model: Transformer, prompt: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The model's own path: contiguous cache, `forward(tokens, start_pos)`; returns tokens and logits per step."""
    model.setup_cache(prompt.shape[0], prompt.shape[1] + steps)
    logits = model(prompt)[:, -1]
    tokens, all_logits = [logits.argmax(-1)], [logits]
    for i in range(steps - 1):
        logits = model(tokens[-1][:, None], start_pos=prompt.shape[1] + i)[:, -1]
        tokens.append(logits.argmax(-1))
        all_logits.append(logits)
    model.clear_cache()
    return tokens, all_logits


def test_padded_size():
    sizes = [1, 2, 4, 8, 32]
    assert [padded_size(b, sizes) for b in (1, 2, 3, 5, 8, 9, 32)] == [1, 2, 4, 8, 8, 32, 32]
    assert padded_size(33, sizes) is None
    with pytest.raises(ValueError, match="batch"):
        padded_size(0, sizes)


def test_prepare_fast_keeps_the_reference_forward():
    model = _model()
    tokens = torch.randint(0, model.args.vocab_size, (2, 9))
    with torch.no_grad():
        expected = model(tokens)
        prepare_fast(model)
        assert isinstance(model.layers[0].mlp, FusedMLP) and isinstance(model.layers[1].mlp, FusedMoE)
        assert isinstance(model.norm, FusedRMSNorm)
        torch.testing.assert_close(model(tokens), expected)


def test_fast_decoder_equals_model_with_cache():
    model = _model()
    ref_model = copy.deepcopy(model)
    prepare_fast(model)
    b, t, steps = 3, 6, 5
    prompt = torch.randint(0, model.args.vocab_size, (b, t))
    tokens, expected = _reference_greedy(ref_model, prompt, steps)
    cache = _cache(model, 40)
    tables = _tables(b, 4, 40)
    dec = FastDecoder(model, cache)
    got = [dec.prefill(prompt, 0, tables)]
    for i in range(steps - 1):
        pos = torch.full((b,), t + i)
        got.append(dec.decode(tokens[i], pos, slots_for(tables, pos, PAGE), tables, (pos + 1).int()))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_chunked_prefill_equals_whole_prefill():
    model = prepare_fast(_model())
    prompt = torch.randint(0, model.args.vocab_size, (2, 10))
    tables = _tables(2, 3, 12)
    whole = FastDecoder(model, _cache(model, 12)).prefill(prompt, 0, tables, last_only=False)
    dec = FastDecoder(model, _cache(model, 12))
    first = dec.prefill(prompt[:, :7], 0, tables, last_only=False)
    second = dec.prefill(prompt[:, 7:], 7, tables, last_only=False)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=1e-5, rtol=1e-5)


def test_padded_prefill_equals_unpadded():
    model = prepare_fast(_model())
    prompts = [torch.randint(0, model.args.vocab_size, (n,)) for n in (5, 8, 2)]
    tables = _tables(3, 2, 8)
    padded = torch.zeros(3, 8, dtype=torch.long)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    cache = _cache(model, 8)
    logits = FastDecoder(model, cache).prefill(padded, 0, tables, lengths=torch.tensor([5, 8, 2]))
    for i, p in enumerate(prompts):
        alone = _cache(model, 8)
        expected = FastDecoder(model, alone).prefill(p[None], 0, tables[i:i + 1])
        torch.testing.assert_close(logits[i], expected[0], atol=1e-5, rtol=1e-5)
        rows = tables[i].long()
        torch.testing.assert_close(cache[:, rows], alone[:, rows], atol=1e-5, rtol=1e-5)  # padding wrote nothing


def test_graphs_refuse_cpu_and_bad_arguments():
    model = prepare_fast(_model())
    dec = FastDecoder(model, _cache(model, 8))
    with pytest.raises(ValueError, match="CUDA"):
        DecodeGraphs(dec, max_blocks=2).capture()
    with pytest.raises(ValueError, match="max_blocks"):
        DecodeGraphs(dec, max_blocks=0)
    with pytest.raises(ValueError, match="kv_cache"):
        FastDecoder(model, torch.zeros(2, 8, PAGE, 5))
    with pytest.raises(ValueError, match="max_blocks"):
        PrefillGraphs(dec, max_blocks=2, lengths=[16])
    with pytest.raises(ValueError, match="CUDA"):
        PrefillGraphs(dec, max_blocks=2, lengths=[8]).capture()


# ---- GPU ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_greedy_gpu_path_equals_cpu_reference_64_steps():
    model = _model()
    prompt = torch.randint(0, model.args.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    steps = 64
    expected, _ = _reference_greedy(copy.deepcopy(model), prompt, steps)
    gpu = prepare_fast(model.cuda())
    per_seq = -(-(8 + steps) // PAGE)
    tables = _tables(1, per_seq, per_seq + 5, "cuda")
    dec = FastDecoder(gpu, _cache(gpu, per_seq + 5, "cuda"))
    graphs = DecodeGraphs(dec, max_blocks=per_seq, batch_sizes=[1, 2])
    graphs.capture()
    tok = dec.prefill(prompt.cuda(), 0, tables).argmax(-1)
    got = [tok]
    for i in range(steps - 1):
        pos = torch.full((1,), 8 + i, device="cuda")
        _, tok = graphs.run(tok, pos, slots_for(tables, pos, PAGE), tables, (pos + 1).int())
        got.append(tok.clone())
    assert torch.cat(got).tolist() == torch.cat(expected).tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_padded_graph_equals_eager_and_leaves_padding_inert(dtype):
    model = prepare_fast(_model(dtype).cuda())
    b, ctx = 3, 9
    tables = _tables(b, 4, 16, "cuda")
    cache = _cache(model, 16, "cuda")
    dec = FastDecoder(model, cache)
    dec.prefill(torch.randint(0, model.args.vocab_size, (b, ctx), device="cuda"), 0, tables)
    graphs = DecodeGraphs(dec, max_blocks=4, batch_sizes=[1, 4])
    graphs.capture()
    tok = torch.randint(0, model.args.vocab_size, (b,), device="cuda")
    pos = torch.full((b,), ctx, device="cuda")
    slots = slots_for(tables, pos, PAGE)
    before = cache.clone()
    eager = dec.decode(tok, pos, slots, tables, (pos + 1).int())
    written = cache.clone()
    cache.copy_(before)
    logits, greedy = graphs.run(tok, pos, slots, tables, (pos + 1).int())
    assert logits.shape == eager.shape
    torch.testing.assert_close(logits, eager, atol=1e-4 if dtype == "float32" else 2e-2, rtol=1e-3)
    assert torch.equal(greedy, logits.argmax(-1))
    flat, flat_written, flat_before = (c.view(model.args.n_layers, -1, c.shape[-1]) for c in (cache, written, before))
    untouched = torch.ones(flat.shape[1], dtype=torch.bool, device="cuda")
    untouched[slots] = False
    assert torch.equal(flat[:, untouched], flat_before[:, untouched])  # the padded row wrote nothing
    torch.testing.assert_close(flat[:, slots], flat_written[:, slots], atol=1e-4 if dtype == "float32" else 2e-2,
                               rtol=1e-3)


@pytest.mark.gpu
def test_prefill_graph_equals_eager_prefill():
    model = prepare_fast(_model().cuda())
    prompt = torch.randint(0, model.args.vocab_size, (7,), device="cuda")
    tables = _tables(1, 4, 10, "cuda")
    eager_cache = _cache(model, 10, "cuda")
    expected = FastDecoder(model, eager_cache).prefill(prompt[None], 0, tables)
    cache = _cache(model, 10, "cuda")
    graphs = PrefillGraphs(FastDecoder(model, cache), max_blocks=4, lengths=[4, 8, 16])
    graphs.capture()
    assert cache.abs().sum() == 0  # capture wrote nothing
    got = graphs.run(prompt, tables[0])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache, eager_cache, atol=1e-5, rtol=1e-5)  # the padded 8th token wrote nothing
