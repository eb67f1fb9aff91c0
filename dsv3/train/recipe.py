"""A training recipe: `TrainConfig` (the fields of a recipe JSON file and of `dsv3 train`'s flags, checked on
construction), reading it (`TrainConfig.from_json`, built-in recipes in `dsv3/train/recipes/`), the model it names
(`model_args`) and its training FLOPs per token (`flops_per_token`, for MFU). The loop itself is
`dsv3.train.trainer`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv3.config import PRESET_DIR, ModelArgs, read_json
from dsv3.train.fp8_select import FP8_EXPERTS, FP8_LAYERS
from dsv3.train.optim import lr_at
from dsv3.train.stop import parse_duration

RECIPE_DIR = Path(__file__).parent / "recipes"
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    model: Any = "tiny"  # preset name, ModelArgs JSON path, or dict of ModelArgs fields
    seq_len: int = 256  # tokens per packed sequence
    batch_size: int = 8  # sequences per rank per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    steps: int = 1000  # optimizer steps
    lr: float = 3e-3  # peak learning rate
    final_lr: float = 3e-4  # floor after the cosine decay
    warmup_steps: int = 100
    decay_frac: float = 0.3  # fraction of `steps` spent in the cosine decay (at the end)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    mtp_weight: float = 0.3  # λ early in training
    mtp_weight_late: float = 0.1  # λ after `mtp_switch_frac` of the steps
    mtp_switch_frac: float = 0.7
    balance_alpha: float = 1e-4  # α of the sequence-wise balance loss
    bias_update_rate: float = 1e-3  # γ of the bias update
    bias_update_rate_early: float | None = None  # γ for the first `bias_early_steps` steps (None: same)
    bias_early_steps: int = 0
    bias_freeze_step: int | None = None  # γ becomes 0 after this many steps (None: never)
    bias_freeze_tokens: int | None = None  # ... or after this many training tokens
    precision: str = "auto"  # bf16 (autocast over float32 masters), fp32 (no autocast), auto: fp32 on CPU, bf16 on GPU
    fp8: bool = False  # FP8 GEMMs in the linear layers (those fp8_layers picks)
    fp8_layers: str = "auto"  # with fp8, which GEMMs: auto (where FP8 gains, by shape, on a GPU) or all (FP8_LAYERS)
    fp8_experts: str = "auto"  # with fp8, the routed experts: auto, loop, grouped or bf16 (see FP8_EXPERTS)
    compile: bool = False  # torch.compile the blocks (whole blocks on the grouped MoE path)
    activation_checkpointing: bool = False
    data_parallel: str = "auto"  # under torchrun: fsdp (FSDP2 shards), ddp, or auto (fsdp where it applies)
    expert_parallel: bool = False  # under torchrun: routed experts spread over the ranks (all-to-all), rest DDP
    seed: int = 0
    eval_every: int = 200  # steps between validation passes (0: only at the end)
    eval_batches: int = 20  # validation micro-batches per pass
    ckpt_every: int = 500  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # most recent checkpoints kept
    log_every: int = 10  # steps between log lines
    export_dtype: str = "bfloat16"  # dtype of the final HF export
    peak_tflops: float = 989.0  # accelerator peak (dense bf16) for MFU; H100/H200 spec
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    time_limit: str | float | None = None  # stop with a checkpoint before this much wall time: 3600, 90m, 2h, 1:30:00
    async_checkpoint: bool = False  # write the DCP state in a background thread while training goes on

    def __post_init__(self) -> None:
        problem = _type_problem(self.to_json())
        if problem:
            raise ValueError(problem)
        positive = ("seq_len", "batch_size", "grad_accum", "steps", "warmup_steps", "eval_batches",
                    "keep_checkpoints", "log_every")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "ckpt_every", "bias_early_steps", "weight_decay", "grad_clip", "balance_alpha", "bias_update_rate",
                     "mtp_weight", "mtp_weight_late", "final_lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("decay_frac", "mtp_switch_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.data_parallel not in ("auto", "fsdp", "ddp"):
            raise ValueError(f"data_parallel must be auto, fsdp or ddp, got {self.data_parallel!r}")
        if self.expert_parallel and (self.data_parallel == "fsdp" or self.compile):
            raise ValueError("expert_parallel runs with DDP for the replicated weights and without compile; "
                             "drop --data-parallel fsdp / --compile")
        if self.fp8_layers not in FP8_LAYERS:
            raise ValueError(f"fp8_layers must be one of {tuple(FP8_LAYERS)}, got {self.fp8_layers!r}")
        if self.fp8_experts not in FP8_EXPERTS:
            raise ValueError(f"fp8_experts must be one of {tuple(FP8_EXPERTS)}, got {self.fp8_experts!r}")
        if self.expert_parallel and self.fp8 and self.fp8_experts == "grouped":
            raise ValueError("fp8_experts grouped does not apply under expert_parallel (its experts run one by "
                             "one); use loop or bf16")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.export_dtype not in ("bfloat16", "float32", "float16"):
            raise ValueError(f"export_dtype must be bfloat16, float16 or float32, got {self.export_dtype!r}")
        if self.time_limit is not None:
            parse_duration(self.time_limit)
        if self.lr <= 0 or self.final_lr > self.lr:
            raise ValueError(f"need 0 < final_lr <= lr, got lr={self.lr}, final_lr={self.final_lr}")

    # ---- schedule --------------------------------------------------------------------------
    @property
    def decay_steps(self) -> int:
        return round(self.decay_frac * self.steps)

    @property
    def stable_steps(self) -> int:
        return max(0, self.steps - self.warmup_steps - self.decay_steps)

    def lr_at(self, step: int) -> float:
        return lr_at(step, self.lr, self.warmup_steps, self.stable_steps, self.decay_steps, self.final_lr)

    def mtp_weight_at(self, step: int) -> float:
        return self.mtp_weight if step < self.mtp_switch_frac * self.steps else self.mtp_weight_late

    # ---- files -----------------------------------------------------------------------------
    @classmethod
    def from_json(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        """Read a recipe (a path, or a name in `dsv3/train/recipes/`) and apply non-None overrides."""
        path = Path(path)
        if not path.exists() and (RECIPE_DIR / f"{path.name}.json").exists():
            path = RECIPE_DIR / f"{path.name}.json"
        if not path.is_file():
            names = sorted(p.stem for p in RECIPE_DIR.glob("*.json"))
            raise FileNotFoundError(f"recipe {str(path)!r} not found (built-in recipes: {names})")
        data = read_json(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a recipe is a JSON object of TrainConfig fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown recipe field(s) {unknown}; known: {sorted(known)}")
        problem = _type_problem(data)
        if problem:
            raise ValueError(f"{path}: {problem}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _type_problem(data: dict) -> str | None:
    """What is wrong with the types of recipe fields in `data` (None when nothing): `lr` must be a number, ..."""
    import types
    import typing
    hints = typing.get_type_hints(TrainConfig)
    for name, value in data.items():
        if name not in hints or name == "model":
            continue
        allowed = typing.get_args(hints[name]) if isinstance(hints[name], types.UnionType) else (hints[name],)
        if value is None and type(None) in allowed:
            continue
        kinds = [t for t in allowed if t in _KINDS]
        ok = any(isinstance(value, t) and not (t in (int, float) and isinstance(value, bool))
                 or (t is float and isinstance(value, int) and not isinstance(value, bool)) for t in kinds)
        if not ok:
            wanted = " or ".join(_KINDS[t] for t in kinds) + (" or null" if type(None) in allowed else "")
            return f"field {name!r} must be {wanted}, got {value!r}"
    return None


def model_args(cfg: TrainConfig, data_meta: dict | None = None) -> ModelArgs:
    """The ModelArgs of a recipe: float32 masters; vocabulary and BOS/EOS from the data when not given."""
    spec = cfg.model
    if isinstance(spec, str):
        path = Path(spec)
        if not path.exists() and (PRESET_DIR / f"{spec}.json").exists():
            path = PRESET_DIR / f"{spec}.json"
        if not path.is_file():
            raise FileNotFoundError(f"model {spec!r} is neither a preset in {PRESET_DIR} nor a JSON file")
        spec = read_json(path)
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: a model spec is a JSON object of ModelArgs fields")
        if spec.get("model_type"):
            spec = ModelArgs.from_hf_config(spec).to_json()
    spec = dict(spec)
    if data_meta is not None:
        spec.setdefault("vocab_size", data_meta["vocab_size"])
        spec.setdefault("bos_token_id", data_meta.get("bos_id", 0))
        spec.setdefault("eos_token_id", data_meta.get("eos_id", 1))
        if spec["vocab_size"] < data_meta["vocab_size"]:
            raise ValueError(f"model vocab_size {spec['vocab_size']} is smaller than the data's "
                             f"vocabulary ({data_meta['vocab_size']})")
    spec["dtype"] = "float32"
    args = ModelArgs(**spec)
    if args.max_seq_len < cfg.seq_len:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {args.max_seq_len}")
    return args


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 × active matmul parameters (MTP modules and the
    head they share included) + causal attention scores/values."""
    from dsv3.model.counts import count_parameters
    counts = count_parameters(args)
    expert = 3 * args.dim * args.moe_inter_dim
    unused_per_moe_layer = expert * (args.n_routed_experts - args.n_activated_experts)
    head = args.dim * args.vocab_size
    d = args.num_nextn_predict_layers
    mtp_active = counts.mtp - d * unused_per_moe_layer + d * head
    matmul = counts.activated_no_embedding + mtp_active
    attention = 3 * (args.n_layers + d) * args.n_heads * (args.qk_head_dim + args.v_head_dim) * seq_len
    return 6.0 * matmul + attention
