"""Which GEMMs `--fp8` runs in FP8: a per-layer choice by shape, like torchao's `module_filter_fn`.

FP8 pays only where a GEMM is large enough that the FP8 product's saving outweighs quantizing its operands
(a pass over the activation and both layouts of the output gradient, which a bf16 GEMM does not need). So on
a GPU a GEMM runs in FP8 only where its shape is at least `MIN_SHAPE[kind]` on both sides; everything else
stays on the bf16 path, so that `--fp8` is not slower than bf16:

- `dense`: a bias-free `nn.Linear` `[N out, K in]` (attention projections, dense and shared-expert MLPs,
  the MTP `eh_proj`); the output head stays in high precision always (the report's section 3.3);
- `grouped`: the routed experts of one MoE layer, as its two grouped GEMMs, `w13` (gate and up stacked:
  N = 2 x moe_inter_dim, K = dim) and `w2` (down: N = dim, K = moe_inter_dim). The layer takes the FP8
  grouped GEMM (`dsv3.train.fp8_grouped.FP8GroupedExperts`) only when both pay.

The thresholds come from measurements and live in `MIN_SHAPE` only: benchmarks/RESULTS.md, "FP8 training at the
released widths (issue 21)" (`benchmarks/fp8_train_linear.py`: every linear shape of the released widths and of
the ~1B benchmark model, bf16 against FP8 forward + backward with the quantization counted: FP8 gained at every
shape with N and K >= 2048, lost at every shape with a side below 1536, and was about even with a side of
1536; `benchmarks/fp8_grouped.py`: the grouped FP8 GEMM gains at the released experts' 7168 x 2048), and
"Training on one H200 (issue 8), third session" for the ~1B model's grouped experts. New measurements go there,
with only `MIN_SHAPE` changed here.

`plan_fp8(model, device, layers, experts)` returns the `FP8Plan`: one `Gemm` per dense linear and two per MoE
layer (path, kind, N, K, FP8 or not, why), the routed experts' path of each MoE layer, and the exact set of
linears to swap; `dsv3.train.parallelize.apply_fp8` applies exactly that, and `FP8Plan.describe()` is what the
trainer prints at start. `layers="all"` is the previous behaviour: every linear but the head in FP8 (the numerics
tests use it). Off a GPU FP8 is only emulated (float32 matmuls over rounded operands: for numerics, not speed),
so there `auto` means `all`, the routed experts on the per-expert FP8 loop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

# (min N, min K) from which FP8 pays on the GPU, per GEMM kind (measured: see the module docstring)
MIN_SHAPE = {"dense": (2048, 2048), "grouped": (2048, 2048)}
HEAD = "lm_head"  # the output head: never FP8


def rule() -> str:
    """The GPU rule in words, from `MIN_SHAPE`."""
    (dn, dk), (gn, gk) = MIN_SHAPE["dense"], MIN_SHAPE["grouped"]
    return (f"dense GEMMs with N >= {dn} and K >= {dk}; routed experts where w13 and w2 both have N >= {gn} and "
            f"K >= {gk}; the output head stays bf16")


# the settings (recipe fields `fp8_layers`, `fp8_experts`) and what each means (`dsv3 train --help`)
FP8_LAYERS = {
    "auto": f"on a GPU only where FP8 gains by shape ({rule()}); on a CPU, where FP8 is emulated, the same as all",
    "all": "every linear but the output head in FP8 (the routed experts as fp8_experts says)",
}
FP8_EXPERTS = {
    "auto": "on a GPU grouped where fp8_layers auto's rule says FP8 gains, else bf16 (bf16 under fp8_layers all); "
            "loop on a CPU",
    "loop": "an FP8 linear per expert on the reference loop (one host sync per MoE layer)",
    "grouped": "the grouped FP8 GEMM (one cuBLAS block-scaled GEMM per expert on Hopper, Triton on other GPUs, "
               "its PyTorch reference elsewhere): the report's numerics for every linear; on an H200 faster than "
               "bf16's grouped GEMM at the released widths, slower at the ~1B model's (benchmarks/RESULTS.md)",
    "bf16": "the routed experts in the autocast precision on the grouped GEMM (the other linears as fp8_layers says)",
}


def fp8_pays(kind: str, n: int, k: int) -> tuple[bool, str]:
    """Whether FP8 pays on a GPU for a GEMM of `kind` ("dense" or "grouped") with N outputs and K inputs, and
    why (the side that is too small, e.g. "K 1024 < 2048")."""
    min_n, min_k = MIN_SHAPE[kind]
    short = [f"{side} {v} < {m}" for side, v, m in (("N", n, min_n), ("K", k, min_k)) if v < m]
    return not short, ", ".join(short) or f"N >= {min_n}, K >= {min_k}"


@dataclass(frozen=True)
class Gemm:
    """One GEMM group of the plan: a dense linear, or one of a MoE layer's two routed-expert GEMMs."""
    path: str  # the nn.Linear's module path; for "grouped", the MoE's
    kind: str  # "dense" or "grouped"
    n: int  # out features (w13: gate and up together)
    k: int  # in features
    fp8: bool
    reason: str
    name: str = ""  # "grouped": "w13" or "w2"

    @property
    def label(self) -> str:
        return f"{self.path}.experts[{self.name}]" if self.kind == "grouped" else self.path


@dataclass
class FP8Plan:
    """What `apply_fp8` does to a model: `linears` become `FP8TrainingLinear`, each MoE layer's routed experts
    take `experts[path]` ("loop": their own linears are in `linears`; "grouped": `FP8GroupedExperts`;
    "bf16": unchanged). `gemms` lists every choice with its reason."""
    layers: str  # the fp8_layers setting asked for
    device: str  # the device type it was planned for
    gemms: list[Gemm] = field(default_factory=list)
    experts: dict[str, str] = field(default_factory=dict)  # MoE path -> loop | grouped | bf16
    linears: frozenset[str] = frozenset()

    @property
    def by_rule(self) -> bool:
        """True when the shape rule decided (auto on a GPU), False when every linear is FP8."""
        return self.layers == "auto" and self.device == "cuda"

    @property
    def experts_path(self) -> str:
        """The routed experts' path when every MoE layer has the same one ("none" without MoE layers)."""
        paths = set(self.experts.values())
        return paths.pop() if len(paths) == 1 else "mixed" if paths else "none"

    def groups(self) -> list[tuple[str, Gemm, int]]:
        """The GEMMs folded over blocks: (path with block indices as `*`, first member, count), in model order.
        Same-shape GEMMs of the main layers and the MTP modules share a line (`{layers,mtp}.*.self_attn.o_proj`)."""
        folded: dict[tuple, list] = {}
        for g in self.gemms:
            pattern = re.sub(r"(^|\.)\d+(?=\.|\[|$)", r"\1*", g.label)
            root, _, rest = pattern.partition(".*.") if ".*." in pattern else ("", "", pattern)
            how = self.experts.get(g.path) if g.kind == "grouped" else None
            entry = folded.setdefault((rest, g.n, g.k, g.fp8, how, g.reason), [[], g, 0])
            entry[0] += [root] if root not in entry[0] else []
            entry[2] += 1
        out = []
        for (rest, *_), (roots, g, count) in folded.items():
            roots = [r for r in roots if r]
            prefix = "" if not roots else f"{roots[0]}.*." if len(roots) == 1 else "{" + ",".join(roots) + "}.*."
            out.append((prefix + rest, g, count))
        return out

    def describe(self) -> list[str]:
        """The start-up lines: a summary, then one line per GEMM group."""
        groups = self.groups()
        n_fp8 = sum(g.fp8 for _, g, _ in groups)
        if self.by_rule:
            head = f"fp8: {n_fp8} of {len(groups)} GEMM groups in FP8 (rule: {rule()})"
        else:
            why = (f"fp8_layers {self.layers}" if self.device == "cuda" else
                   f"fp8_layers {self.layers} on {self.device} = all: FP8 is only emulated there, for numerics")
            head = (f"fp8: {n_fp8} of {len(groups)} GEMM groups in FP8 ({why}; every linear but the output head, "
                    f"routed experts {self.experts_path})")
        width = max((len(p) for p, _, _ in groups), default=0)
        lines = [head]
        for pattern, g, count in groups:
            how = ("fp8" if g.fp8 else "bf16") + (f" {self.experts[g.path]}" if g.kind == "grouped" and g.fp8 else "")
            lines.append(f"  {pattern:<{width}}  {g.k:>6}->{g.n:<6} x{count:<3} {how:<11} {g.reason}")
        return lines


def _plain_linear(module: nn.Module) -> bool:
    """A linear `swap_to_fp8` can swap: exactly `nn.Linear`, bias-free."""
    return type(module) is nn.Linear and module.bias is None


def _moe_shapes(moe: nn.Module) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(N, K) of w13 and of w2 from the first local expert with plain weights (None: no such expert here)."""
    for expert in moe.experts:
        gate, down = getattr(expert, "gate_proj", None), getattr(expert, "down_proj", None)
        if isinstance(gate, nn.Linear) and isinstance(down, nn.Linear):
            return (2 * gate.out_features, gate.in_features), (down.out_features, down.in_features)
    return None


def plan_fp8(model: nn.Module, device: torch.device | str, layers: str = "auto", experts: str = "auto") -> FP8Plan:
    """The FP8 choice for every GEMM of `model` (see the module docstring). `device`: where it trains (only its
    type is read); `layers`: "auto" (the shape rule on a GPU, every linear elsewhere) or "all"; `experts`: the
    routed experts' path, "auto" (the rule on a GPU with layers auto; loop on a CPU; bf16 on a GPU with layers
    all) or forced "loop", "grouped", "bf16"."""
    from dsv3.model.moe import LocalExperts, MoE

    if layers not in FP8_LAYERS:
        raise ValueError(f"fp8_layers must be one of {tuple(FP8_LAYERS)}, got {layers!r}")
    if experts not in FP8_EXPERTS:
        raise ValueError(f"fp8_experts must be one of {tuple(FP8_EXPERTS)}, got {experts!r}")
    device = torch.device(device).type
    by_rule = layers == "auto" and device == "cuda"
    plan = FP8Plan(layers, device)
    linears: set[str] = set()
    moes = {name: m for name, m in model.named_modules() if isinstance(m, MoE)}
    expert_prefixes = tuple(f"{name}.experts." if name else "experts." for name in moes)
    for name, module in model.named_modules():
        if name in moes:
            shapes = _moe_shapes(module)
            if shapes is None:
                continue
            (n13, k13), (n2, k2) = shapes
            local = type(module.experts_impl) is LocalExperts  # not expert parallel (experts run one by one)
            if experts == "grouped" and not local:
                raise ValueError(f"fp8_experts grouped does not apply to {name} (its experts run as "
                                 f"{type(module.experts_impl).__name__}); use loop or bf16")
            if experts != "auto":
                path, why = experts, f"fp8_experts {experts}"
            elif device != "cuda":
                path, why = "loop", f"emulated on {device}"
            elif not by_rule:
                path, why = "bf16", "fp8_layers all: routed experts stay bf16 (fp8_experts grouped for FP8)"
            else:
                ok13, why13 = fp8_pays("grouped", n13, k13)
                ok2, why2 = fp8_pays("grouped", n2, k2)
                if not local:
                    path, why = "bf16", f"{type(module.experts_impl).__name__}: no grouped FP8 path"
                elif ok13 and ok2:
                    path, why = "grouped", f"w13 and w2: {why13}"
                else:
                    path, why = "bf16", "; ".join(f"{w} {r}" for w, ok, r in (("w13", ok13, why13), ("w2", ok2, why2))
                                                  if not ok)
            plan.experts[name] = path
            for gemm, n, k in (("w13", n13, k13), ("w2", n2, k2)):
                plan.gemms.append(Gemm(name, "grouped", n, k, path != "bf16", why, gemm))
            if path == "loop":
                prefix = f"{name}.experts." if name else "experts."
                linears.update(f"{prefix}{sub}" for sub, m in module.experts.named_modules() if _plain_linear(m))
            continue
        if not _plain_linear(module) or name.startswith(expert_prefixes):
            continue
        if name.split(".")[-1] == HEAD:
            plan.gemms.append(Gemm(name, "dense", module.out_features, module.in_features, False, "output head"))
            continue
        if by_rule:
            ok, why = fp8_pays("dense", module.out_features, module.in_features)
        else:
            ok, why = True, f"fp8_layers {layers}" if device == "cuda" else f"emulated on {device}"
        plan.gemms.append(Gemm(name, "dense", module.out_features, module.in_features, ok, why))
        if ok:
            linears.add(name)
    plan.linears = frozenset(linears)
    return plan
