"""Tensor- and expert-parallel inference on CPU gloo, against one process on the whole model (the oracle):
logits within 1e-5 (fp32) for tp=2, ep=2 (all-to-all and the demo's all-reduce) and a pre-split folder in 2
spawned processes and tp=2 x ep=2 (both exchanges) in 4, and greedy tokens through `LLM` identical for tp=2, both
ep=2 exchanges and tp=2 x ep=2 all-to-all; each rank's split parameters about 1/N of the whole;
shard-on-load reads only the rank's slices (bytes counted at the safetensors reads, FP8 too) and keeps FP8 codes
and block scales split on their blocks; a rank stuck past the collective timeout stops rank 0 with one clear
error; one process changes nothing."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.multiprocessing as mp

import dsv3
from dsv3.checkpoint import load as load_mod
from dsv3.checkpoint.convert import bf16_to_fp8
from dsv3.checkpoint.shard import convert_shard
from dsv3.engine import EngineConfig, LLM, SamplingParams
from dsv3.model.parallel import RemoteExpert, parallelize_for_inference, split_parameter_bytes
from dsv3.parallel import ParallelContext, ParallelLayout
from hf_models import make_v3
from test_train_ddp import _free_port

TOKENS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
PROMPTS = [[5, 17, 99, 3], [200, 1, 42, 7, 7]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("parallel") / "v3"
    make_v3(path)  # 4 heads, vocab 256, 8 routed experts + 1 shared, 2 dense layers
    return path


def _engine(model) -> LLM:
    return LLM(model, config=EngineConfig(device="cpu", dtype="float32", num_blocks=32, block_size=4))


def _worker(rank: int, world: int, port: int, path: str, cases: list, out: str, stuck: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DSV3_DIST_TIMEOUT="120")
    torch.set_num_threads(1)
    results = {}
    for name, folder, tp, ep, moe, generate in cases:
        model = dsv3.load_model(folder or path, dtype=torch.float32, tp=tp, ep=ep, moe=moe, progress=False)
        with torch.no_grad():
            logits = model(TOKENS)
        split, rest = split_parameter_bytes(model)
        experts = sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if ".experts." in k)
        tokens = None
        if generate:
            llm = _engine(model)
            tokens = [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]  # rank 0 answers
            llm.close()  # every rank: the engine is done
        results[name] = {"logits": logits, "split": split, "rest": rest, "experts": experts, "tokens": tokens,
                         "remote": sum(isinstance(m, RemoteExpert) for m in model.modules())}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    if stuck:  # last: rank 1 stops following; rank 0 must fail within the timeout, not hang
        ctx = ParallelContext.from_env(tp=world, timeout=3)
        llm = _engine(dsv3.load_model(path, dtype=torch.float32, parallel=ctx, progress=False))
        if rank == 1:
            time.sleep(8)
            os._exit(0)
        start = time.monotonic()
        try:
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)
            message = "no error"
        except RuntimeError as e:
            message = str(e)
        with open(os.path.join(out, "stuck.txt"), "w") as f:
            f.write(f"{time.monotonic() - start}\n{message}")
        os._exit(0)
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def reference(ckpt):
    return _reference(ckpt)


def _reference(path):
    """Logits, greedy tokens, bytes of the parts a split divides (experts, heads' projections, MLPs, vocabulary)
    and of the routed experts alone, of one process on the whole model."""
    model = dsv3.load_model(path, dtype=torch.float32, progress=False)
    with torch.no_grad():
        logits = model(TOKENS)
    tokens = [o.token_ids for o in _engine(model).generate(PROMPTS, GREEDY, use_tqdm=False)]
    divided = ("experts", "q_b_proj", "kv_b_proj", "o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
               "embed_tokens", "lm_head")
    sizes = {k: t.numel() * t.element_size() for k, t in model.state_dict().items()}
    split = sum(v for k, v in sizes.items() if any(d in k for d in divided))
    experts = sum(v for k, v in sizes.items() if ".experts." in k)
    return logits, tokens, split, experts


def _spawn(world: int, path, cases, tmp_path, stuck: bool = False) -> list[dict]:
    mp.spawn(_worker, args=(world, _free_port(), str(path), cases, str(tmp_path), stuck), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _check(results, name, ref_logits, ref_tokens, shares: dict[str, tuple[float, int]]) -> None:
    """Every rank's logits equal the reference's, rank 0's greedy tokens too (the others answer nothing), and
    each rank holds `share` of the `whole` bytes of each kind of split part (`"split"` or `"experts"`)."""
    for r, res in enumerate(results):
        got = res[name]
        err = (got["logits"] - ref_logits).abs().max().item()
        assert err < 1e-5, f"{name} rank {r}: logits differ by {err}"
        for kind, (share, whole) in shares.items():
            held = got[kind] / whole
            assert abs(held - share) < 0.02, f"{name} rank {r}: holds {held:.3f} of the {kind} bytes, not {share}"
    if results[0][name]["tokens"] is not None:
        assert results[0][name]["tokens"] == ref_tokens, name
        assert all(res[name]["tokens"] == [] for res in results[1:])  # only rank 0 answers


def test_two_ranks_equal_one_process_and_a_stuck_rank_stops_the_group(ckpt, reference, tmp_path):
    presplit = tmp_path / "presplit"
    convert_shard(ckpt, presplit, tp=2, ep=1, progress=False)
    cases = [("tp2", None, 2, 1, "all-to-all", True), ("ep2", None, 1, 2, "all-to-all", True),
             ("ep2-demo", None, 1, 2, "all-reduce", True), ("tp2-presplit", str(presplit), 2, 1, "all-to-all", False)]
    results = _spawn(2, ckpt, cases, tmp_path, stuck=True)
    ref_logits, ref_tokens, split, experts = reference
    for name in ("tp2", "tp2-presplit"):
        _check(results, name, ref_logits, ref_tokens, {"split": (1 / 2, split)})
    for name in ("ep2", "ep2-demo"):  # EP splits the routed experts only
        _check(results, name, ref_logits, ref_tokens, {"experts": (1 / 2, experts)})
    assert all(res["ep2"]["remote"] == 2 * 4 for res in results)  # 2 MoE layers x 4 experts owned elsewhere
    seconds, message = (tmp_path / "stuck.txt").read_text().split("\n", 1)
    assert message.startswith("rank 0: a follower rank died or stopped answering (collective timeout 3s"), message
    assert float(seconds) < 15  # the timeout, not a hang


def test_four_ranks_tp2_by_ep2_equal_one_process(ckpt, reference, tmp_path):
    cases = [("tp2xep2", None, 2, 2, "all-to-all", True), ("tp2xep2-demo", None, 2, 2, "all-reduce", False)]
    results = _spawn(4, ckpt, cases, tmp_path)
    ref_logits, ref_tokens, split, experts = reference
    for name in ("tp2xep2", "tp2xep2-demo"):  # experts: half of them, each split in two; the rest in two
        _check(results, name, ref_logits, ref_tokens, {"experts": (1 / 4, experts)})
        for res in results:
            rest_share = (res[name]["split"] - res[name]["experts"]) / (split - experts)
            assert abs(rest_share - 1 / 2) < 0.02, rest_share


class _Counting:
    """A safetensors file whose reads are counted (bytes of every tensor or slice handed out)."""

    def __init__(self, inner, counter: list[int]) -> None:
        self.inner, self.counter = inner, counter

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def keys(self):
        return self.inner.keys()

    def _count(self, t: torch.Tensor) -> torch.Tensor:
        self.counter[0] += t.numel() * t.element_size()
        return t

    def get_tensor(self, name):
        return self._count(self.inner.get_tensor(name))

    def get_slice(self, name):
        outer, sl = self, self.inner.get_slice(name)

        class Slice:
            def get_dtype(self):
                return sl.get_dtype()

            def get_shape(self):
                return sl.get_shape()

            def __getitem__(self, index):
                return outer._count(sl[index])
        return Slice()


@pytest.mark.parametrize("fp8", [False, True])
def test_shard_on_load_reads_only_the_ranks_slices(ckpt, tmp_path, monkeypatch, fp8):
    source = ckpt
    if fp8:  # block-scaled FP8 files; this tiny model's splits fall inside 128-blocks: read whole blocks, cut
        source = tmp_path / "fp8"
        bf16_to_fp8(ckpt, source)
    full = dsv3.load_model(source, dtype=torch.float32, progress=False).state_dict()
    counter = [0]
    real_open = load_mod.open_shard
    monkeypatch.setattr(load_mod, "open_shard", lambda f: _Counting(real_open(f), counter))
    counter[0] = 0
    whole = dsv3.load_model(source, dtype=torch.float32, progress=False)
    whole_bytes = counter[0]
    layout = ParallelLayout(tp=2, ep=2, rank=3)
    counter[0] = 0
    part = dsv3.load_model(source, dtype=torch.float32, progress=False,
                           parallel=ParallelContext(layout, torch.device("cpu")))
    part_bytes = counter[0]
    held = sum(t.numel() * t.element_size() for t in part.state_dict().values())
    if fp8:  # parts inside 128-blocks read their whole blocks, but the experts of other ranks are never read
        assert part_bytes < 0.8 * whole_bytes, (part_bytes, whole_bytes)
    else:  # float32 files into a float32 model: exactly the bytes this rank keeps, each read once
        assert part_bytes == held and part_bytes < 0.45 * whole_bytes, (part_bytes, held, whole_bytes)
    plan = part.shard_plan
    for key, t in part.state_dict().items():  # every tensor this rank holds is its slice of the whole
        want = full[key]
        if key in plan.slices:
            dim, lo, hi = plan.slices[key]
            want = want.narrow(dim, lo, hi - lo)
        assert torch.equal(t, want), key
    assert not any(k in plan.elsewhere for k in part.state_dict())
    assert len(whole.state_dict()) == len(full)


def test_fp8_weights_load_split_on_their_blocks(tmp_path):
    """FP8 kept in memory (`weights="fp8"`): each rank gets its rows/columns of the e4m3 codes and of their
    128-block scales, equal to the whole FP8 model's, when the dims split on 128-blocks."""
    src = tmp_path / "aligned"
    make_v3(src, hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_attention_heads=4,
            num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=64,
            v_head_dim=64, num_hidden_layers=3, first_k_dense_replace=1)
    fp8 = tmp_path / "fp8"
    bf16_to_fp8(src, fp8)
    full = dsv3.load_model(fp8, dtype=torch.float32, weights="fp8", progress=False).state_dict()
    for rank in (0, 3):  # the first and the last part of every split
        part = dsv3.load_model(fp8, dtype=torch.float32, weights="fp8", progress=False,
                               parallel=ParallelContext(ParallelLayout(2, 2, rank), torch.device("cpu")))
        plan = part.shard_plan
        codes = 0
        for key, t in part.state_dict().items():
            want = full[key]
            weight_key = key.removesuffix("_scale_inv")
            if weight_key in plan.slices:
                dim, lo, hi = plan.slices[weight_key]
                if key.endswith("_scale_inv"):
                    lo, hi = lo // 128, -(-hi // 128)
                want = want.narrow(dim, lo, hi - lo)
            codes += t.dtype == torch.float8_e4m3fn
            assert t.dtype == want.dtype and torch.equal(t.view(torch.uint8) if t.element_size() == 1 else t,
                                                         want.view(torch.uint8) if want.element_size() == 1
                                                         else want), (rank, key)
        assert codes > 0


def test_one_process_changes_nothing(ckpt):
    model = dsv3.load_model(ckpt, dtype=torch.float32, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(TOKENS)
    assert model.parallel.world == 1 and not model.shard_plan.slices  # load_model ran the pass with one rank
    fresh = dsv3.load_model(ckpt, dtype=torch.float32, progress=False, parallel=ParallelContext.single())
    with torch.no_grad():
        assert torch.equal(fresh(TOKENS), expected)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    two = ParallelContext(ParallelLayout(2, 1, 0), torch.device("cpu"))  # a layout only: never runs a collective
    parallelize_for_inference(fresh, two)
    with pytest.raises(ValueError, match="already split"):
        parallelize_for_inference(fresh, two)
    with pytest.raises(ValueError, match="needs 2 processes"):
        dsv3.load_model(ckpt, dtype=torch.float32, progress=False, tp=2)
    with pytest.raises(ValueError, match=r"vocabulary size \(256\) does not divide over 3 ranks; choose --tp"):
        parallelize_for_inference(model, ParallelContext(ParallelLayout(3, 1, 0), torch.device("cpu")))
