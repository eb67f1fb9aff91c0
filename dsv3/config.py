"""Model hyper-parameters: one dataclass, validated once, round-tripping HF `config.json`.

`ModelArgs` holds every DeepSeek-V3 (and V2-style) hyper-parameter under short names; the HF names
live only in `from_hf_config` / `to_hf_config`. Named presets are JSON files in `dsv3/configs/`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).parent / "configs"


def read_json(path: str | Path) -> Any:
    """The JSON in file `path`; invalid JSON or text is a ValueError naming the file and the line/column."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}): {e.reason}") from None


SCORE_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class ModelArgs:
    # sizes
    vocab_size: int = 129280
    dim: int = 7168
    inter_dim: int = 18432
    moe_inter_dim: int = 2048
    n_layers: int = 61
    n_dense_layers: int = 3
    n_heads: int = 128
    # multi-head latent attention
    q_lora_rank: int = 1536  # 0 = no query compression (q_proj)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # mixture of experts
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 8
    n_expert_groups: int = 8
    n_limited_groups: int = 4
    score_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    route_scale: float = 2.5
    correction_bias: bool = True
    # multi-token prediction
    num_nextn_predict_layers: int = 1
    # rotary embedding (YaRN when rope_factor > 1)
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    original_seq_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    rope_interleave: bool = True
    # misc
    rms_norm_eps: float = 1e-6
    max_seq_len: int = 163840
    dtype: str = "bfloat16"
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    tie_word_embeddings: bool = False
    init_std: float = 0.006
    extra_hf: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.q_lora_rank is None:
            self.q_lora_rank = 0
        positive = ("vocab_size", "dim", "inter_dim", "n_layers", "n_heads", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_seq_len")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("q_lora_rank", "n_dense_layers", "n_shared_experts", "num_nextn_predict_layers"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.n_dense_layers > self.n_layers:
            raise ValueError(f"n_dense_layers ({self.n_dense_layers}) must be <= n_layers ({self.n_layers})")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func must be one of {SCORE_FUNCS}, got {self.score_func!r}")
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(f"topk_method must be one of {TOPK_METHODS}, got {self.topk_method!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.has_moe:
            if self.n_routed_experts <= 0:
                raise ValueError(f"n_routed_experts must be > 0 when there are MoE layers, got {self.n_routed_experts}")
            if self.moe_inter_dim <= 0:
                raise ValueError(f"moe_inter_dim must be > 0, got {self.moe_inter_dim}")
            if not 1 <= self.n_activated_experts <= self.n_routed_experts:
                raise ValueError(f"n_activated_experts must be in [1, n_routed_experts={self.n_routed_experts}], "
                                 f"got {self.n_activated_experts}")
            if self.n_expert_groups < 1 or self.n_routed_experts % self.n_expert_groups:
                raise ValueError(f"n_expert_groups ({self.n_expert_groups}) must divide n_routed_experts "
                                 f"({self.n_routed_experts})")
            if not 1 <= self.n_limited_groups <= self.n_expert_groups:
                raise ValueError(f"n_limited_groups must be in [1, n_expert_groups={self.n_expert_groups}], "
                                 f"got {self.n_limited_groups}")
            per_group = self.n_routed_experts // self.n_expert_groups
            if self.n_limited_groups * per_group < self.n_activated_experts:
                raise ValueError(f"n_limited_groups ({self.n_limited_groups}) x experts per group ({per_group}) "
                                 f"must be >= n_activated_experts ({self.n_activated_experts})")
            if self.topk_method == "noaux_tc" and self.n_expert_groups > 1 and per_group < 2:
                raise ValueError("noaux_tc group scores sum each group's top-2: n_routed_experts / n_expert_groups "
                                 f"must be >= 2, got {per_group}")
        if self.rope_factor <= 0:
            raise ValueError(f"rope_factor must be > 0, got {self.rope_factor}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")

    # ---- derived -------------------------------------------------------------------------
    @property
    def has_moe(self) -> bool:
        return self.n_layers > self.n_dense_layers or self.num_nextn_predict_layers > 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn(self) -> bool:
        return self.rope_factor > 1.0

    @property
    def softmax_scale(self) -> float:
        """`(d_nope + d_rope)^-0.5`, times `m^2` with YaRN (`m = 0.1 * mscale_all_dim * ln(factor) + 1`)."""
        scale = self.qk_head_dim ** -0.5
        if self.yarn and self.mscale_all_dim:
            m = 0.1 * self.mscale_all_dim * math.log(self.rope_factor) + 1.0
            scale = scale * m * m
        return scale

    @property
    def torch_dtype(self):
        import torch
        return getattr(torch, self.dtype)

    def is_moe_layer(self, layer_id: int) -> bool:
        """Layers from `n_dense_layers` on (MTP layers included) use DeepSeekMoE."""
        return layer_id >= self.n_dense_layers

    def replace(self, **changes: Any) -> "ModelArgs":
        return dataclasses.replace(self, **changes)

    # ---- presets / json ------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str) -> "ModelArgs":
        path = PRESET_DIR / f"{name}.json"
        if not path.exists():
            names = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
            raise ValueError(f"unknown preset {name!r}; choose one of {names}")
        return cls.from_json(path)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelArgs":
        data = read_json(path)
        if data.get("model_type") in ("deepseek_v3", "deepseek_v2"):
            return cls.from_hf_config(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {unknown}")
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra_hf")
        return d

    # ---- HF config.json ------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any] | str | Path) -> "ModelArgs":
        """Read a HF DeepSeek-V3/V2 `config.json` (dict, file, or checkpoint folder)."""
        if not isinstance(cfg, dict):
            path = Path(cfg)
            if path.is_dir():
                path = path / "config.json"
            if not path.exists():
                raise FileNotFoundError(f"config.json not found: {path}")
            cfg = read_json(path)
        if not isinstance(cfg, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
        cfg = dict(cfg)
        model_type = cfg.get("model_type")
        if model_type not in ("deepseek_v3", "deepseek_v2"):
            raise ValueError(f"model_type must be 'deepseek_v3' or 'deepseek_v2', got {model_type!r}")
        v3 = model_type == "deepseek_v3"
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        if rope_type not in ("default", "yarn"):
            raise ValueError(f"rope type must be 'default' or 'yarn', got {rope_type!r}")
        yarn = rope_type == "yarn"
        default_topk = "noaux_tc" if v3 else "greedy"
        topk_method = cfg.get("topk_method") or default_topk
        n_routed = cfg.get("n_routed_experts") or 0
        args = dict(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            inter_dim=cfg["intermediate_size"],
            moe_inter_dim=cfg.get("moe_intermediate_size") or 0,
            n_layers=cfg["num_hidden_layers"],
            n_dense_layers=cfg.get("first_k_dense_replace", 0) if n_routed else cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            q_lora_rank=cfg.get("q_lora_rank") or 0,
            kv_lora_rank=cfg["kv_lora_rank"],
            qk_nope_head_dim=cfg["qk_nope_head_dim"],
            qk_rope_head_dim=cfg["qk_rope_head_dim"],
            v_head_dim=cfg["v_head_dim"],
            n_routed_experts=n_routed,
            n_shared_experts=cfg.get("n_shared_experts") or 0,
            n_activated_experts=cfg.get("num_experts_per_tok") or 1,
            n_expert_groups=cfg.get("n_group") or 1,
            n_limited_groups=cfg.get("topk_group") or 1,
            score_func=cfg.get("scoring_func") or ("sigmoid" if v3 else "softmax"),
            topk_method=topk_method,
            norm_topk_prob=bool(cfg.get("norm_topk_prob", v3)),
            route_scale=float(cfg.get("routed_scaling_factor", 1.0)),
            correction_bias=topk_method == "noaux_tc",
            num_nextn_predict_layers=cfg.get("num_nextn_predict_layers", cfg.get("num_mtp_layers", 0)) or 0,
            rope_theta=float(theta),
            rope_factor=float(rope.get("factor", 1.0)) if yarn else 1.0,
            original_seq_len=int(rope.get("original_max_position_embeddings", cfg["max_position_embeddings"])),
            beta_fast=float(rope.get("beta_fast") or 32),
            beta_slow=float(rope.get("beta_slow") or 1),
            mscale=float(rope.get("mscale") or 0.0) if yarn else 1.0,
            mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0) if yarn else 1.0,
            rope_interleave=bool(cfg.get("rope_interleave", True)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_seq_len=int(cfg["max_position_embeddings"]),
            dtype=_dtype_name(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            init_std=float(cfg.get("initializer_range", 0.006)),
        )
        used = {"model_type", "architectures", "transformers_version", "rope_parameters", "rope_scaling",
                "rope_theta", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "first_k_dense_replace", "num_attention_heads", "num_key_value_heads", "q_lora_rank",
                "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
                "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group", "scoring_func",
                "topk_method", "norm_topk_prob", "routed_scaling_factor", "num_nextn_predict_layers",
                "num_mtp_layers", "rope_interleave", "rms_norm_eps", "max_position_embeddings", "dtype",
                "torch_dtype", "bos_token_id", "eos_token_id", "tie_word_embeddings", "initializer_range",
                "vocab_size", "head_dim", "qk_head_dim"}
        extra = {k: v for k, v in cfg.items() if k not in used}
        return cls(**args, extra_hf=extra)

    def to_hf_config(self) -> dict[str, Any]:
        """HF `config.json` dict (`model_type: deepseek_v3`, or `deepseek_v2` for softmax routing)."""
        v3 = self.score_func == "sigmoid"
        cfg: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
            "model_type": "deepseek_v3" if v3 else "deepseek_v2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.inter_dim,
            "moe_intermediate_size": self.moe_inter_dim,
            "num_hidden_layers": self.n_layers,
            "first_k_dense_replace": self.n_dense_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_heads,
            "q_lora_rank": self.q_lora_rank or None,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.n_activated_experts,
            "n_group": self.n_expert_groups,
            "topk_group": self.n_limited_groups,
            "scoring_func": self.score_func,
            "topk_method": self.topk_method,
            "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.route_scale,
            "num_nextn_predict_layers": self.num_nextn_predict_layers,
            "hidden_act": "silu",
            "rope_interleave": self.rope_interleave,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_seq_len,
            "initializer_range": self.init_std,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "torch_dtype": self.dtype,
        }
        if self.yarn:
            rope = {"rope_type": "yarn", "type": "yarn", "factor": self.rope_factor,
                    "original_max_position_embeddings": self.original_seq_len, "beta_fast": self.beta_fast,
                    "beta_slow": self.beta_slow, "mscale": self.mscale, "mscale_all_dim": self.mscale_all_dim,
                    "rope_theta": self.rope_theta}
            cfg["rope_scaling"] = rope
        cfg["rope_theta"] = self.rope_theta
        out = {**self.extra_hf, **cfg}
        return out


_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def _dtype_name(name: Any) -> str:
    """Normalise `torch.bfloat16` / `"bf16"` / `"bfloat16"` to a name in `DTYPES`; other dtypes (e.g. the
    float8 of a quantized checkpoint) compute in bfloat16."""
    name = str(name).replace("torch.", "")
    name = _DTYPE_ALIASES.get(name, name)
    return name if name in DTYPES else "bfloat16"
