"""Flags the verbs share, their checks, and the one place that turns them into library objects.

Groups: model (`--model`), device (`--device`), dtype (`--dtype`), sampling (`--max-new-tokens`,
`--temperature`, `--top-p`, `--top-k`, `--seed`, `--min-p`, `--presence-penalty`, `--frequency-penalty`,
`--repetition-penalty`, `--stop`)
and engine (cache size, batch limits, prefix caching,
`--fast`). Every verb that takes one of them takes it with the same name, values and default:
`--dtype` is `auto|bfloat16|float16|float32` (`auto`: float32 on a CPU, bfloat16 on a GPU) and
`--device` defaults to cuda when available, else cpu.

Values are checked while parsing (argparse `type=` functions), so a bad one is reported before
anything loads. What needs torch (`resolve_device`, `sampling_params`) imports it when called, never
while the parser is built, so `dsv3 --help` stays fast. `engine_config` is the one place where the
flags become the engine's `EngineConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsv3.engine.config import DTYPES, FP8_POLICIES, MAX_DRAFT_TOKENS, WEIGHTS, EngineConfig

if TYPE_CHECKING:
    from dsv3.engine.sampling import SamplingParams

DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_TEMPERATURE = 0.3  # DeepSeek-V3's recommended model temperature
_ENGINE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EngineConfig)}


class UsageError(Exception):
    """The command line asks for something impossible: reported as one line, exit code 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to a flag's help unless the help already says what the default is (or the flag
    is required, or its default is None: those helps say in words what happens without the flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default in (None, argparse.SUPPRESS) or action.required
                or not action.option_strings):
            return text
        return super()._get_help_string(action)


class RawDescriptionFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`HelpFormatter` that keeps the description's line breaks (for a description holding examples)."""


class Parser(argparse.ArgumentParser):
    """An argument parser that reports a bad command line as one line (no usage block), exit code 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---- value types (argparse `type=`): an ArgumentTypeError becomes "argument --x: <message>" ----------
def _number(text: str, cast: type, kind: str) -> Any:
    try:
        return cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _number(text, int, "an integer >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    value = _number(text, int, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def nonnegative_float(text: str) -> float:
    value = _number(text, float, "a number >= 0")
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def probability(text: str) -> float:
    """A number in (0, 1]."""
    value = _number(text, float, "a number in (0, 1]")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def unit_interval(text: str) -> float:
    """A number in [0, 1]."""
    value = _number(text, float, "a number in [0, 1]")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def penalty(text: str) -> float:
    """A presence or frequency penalty: a number in [-2, 2], as in the OpenAI API."""
    value = _number(text, float, "a number in [-2, 2]")
    if not -2.0 <= value <= 2.0:
        raise argparse.ArgumentTypeError(f"must be in [-2, 2], got {text}")
    return value


def repetition_penalty(text: str) -> float:
    value = _number(text, float, "a number")
    if not 0.0 < value <= 10.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 10] (1 = off), got {text!r}")
    return value


def stop_string(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def device_name(text: str) -> str:
    """cpu, cuda or cuda:N (whether it exists here is checked by `resolve_device`)."""
    kind, colon, index = text.partition(":")
    if text in ("cpu", "cuda") or (kind == "cuda" and colon and index.isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")


def byte_size(text: str) -> int:
    """Bytes, optionally with a K, M or G suffix (powers of 1024): 536870912, 512M, 2G."""
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
    value = _number(text[:-1] if scale > 1 else text, float, "a size in bytes such as 536870912, 512M or 2G") * scale
    if not 1 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be at least 1 byte and finite, got {text!r}")
    return int(value)


# ---- flag groups ---------------------------------------------------------------------------------
def add_model(p: argparse.ArgumentParser, weights: bool = False) -> None:
    """`--model`, and with `weights=True` also `--weights` (for verbs that load through `load_model` below)."""
    p.add_argument("--model", metavar="DIR", default=None,
                   help="HF-format DeepSeek-V3 checkpoint folder (config.json, *.safetensors, tokenizer.json), or "
                        "a LoRA adapter folder from `dsv3 sft` (merged with its base once, into ~/.cache/dsv3/models) "
                        "(default: the built-in chat model for chat, serve and generate --chat; the built-in base "
                        "model otherwise)")
    if weights:
        p.add_argument("--weights", choices=WEIGHTS, default="auto",
                       help="how Linear weights sit in memory: bf16 = dequantized to --dtype at load; fp8 = kept as "
                            "128x128-block FP8 (half the bytes; an FP8 checkpoint stays FP8, a BF16 one is quantized "
                            "at load); auto = the checkpoint's own format on a GPU, bf16 on a CPU "
                            "(default: %(default)s)")
        p.add_argument("--fp8-policy", choices=FP8_POLICIES, default="auto",
                       help="how FP8 weights meet the activations: w8a16 = weights dequantized in registers, "
                            "activations stay BF16 (the official demo's way; fastest for decode); w8a8 = activations "
                            "quantized per 1x128 tile, FP8 tensor-core GEMMs (the report's way; fastest for "
                            "prefill); auto = w8a8 from 64 rows on GPUs with FP8 tensor cores (sm89+), else w8a16 "
                            "(default: %(default)s)")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", metavar="DEV", type=device_name, default=None,
                   help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")


def add_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weights and activations; auto = float32 on a CPU (faster there), bfloat16 on a GPU "
                        "(default: %(default)s)")


def add_sampling(p: argparse.ArgumentParser, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens, metavar="N",
                   help="most tokens to generate per answer (default: %(default)s)")
    g.add_argument("--temperature", type=nonnegative_float, default=DEFAULT_TEMPERATURE, metavar="T",
                   help="sampling temperature, >= 0; 0 is greedy (default: %(default)s)")
    g.add_argument("--top-p", type=probability, default=1.0, metavar="P",
                   help="nucleus sampling: keep the most likely tokens up to mass P, in (0, 1] (default: %(default)s)")
    g.add_argument("--top-k", type=nonnegative_int, default=0, metavar="K",
                   help="keep only the K most likely tokens; 0 keeps all (default: %(default)s)")
    g.add_argument("--seed", type=int, default=None, metavar="S",
                   help="random seed for sampling (default: none, a fresh draw each run)")
    g.add_argument("--min-p", type=unit_interval, default=0.0, metavar="P",
                   help="drop tokens less likely than P times the most likely one, in [0, 1]; 0 keeps all "
                        "(default: %(default)s)")
    g.add_argument("--presence-penalty", type=penalty, default=0.0, metavar="X",
                   help="subtract X from the logit of every token already generated, in [-2, 2] (default: %(default)s)")
    g.add_argument("--frequency-penalty", type=penalty, default=0.0, metavar="X",
                   help="subtract X times its count so far from each generated token's logit, in [-2, 2] "
                        "(default: %(default)s)")
    g.add_argument("--repetition-penalty", type=repetition_penalty, default=1.0, metavar="R",
                   help="divide the positive logits (multiply the negative ones) of every token already in the prompt "
                        "or the answer by R, as HF and vLLM do; > 1 discourages repeats, 1 is off, in (0, 10] "
                        "(default: %(default)s)")
    g.add_argument("--stop", action="append", type=stop_string, default=None, metavar="TEXT",
                   help="end the answer where TEXT appears (not included); repeat for several (default: none)")


def add_engine(p: argparse.ArgumentParser, max_model_len: bool = True) -> None:
    """The `EngineConfig` fields as flags, defaults taken from the dataclass."""
    g = p.add_argument_group("engine")
    g.add_argument("--num-blocks", type=positive_int, default=None, metavar="N",
                   help="paged latent-cache blocks (default: sized from --cache-memory)")
    g.add_argument("--cache-memory", type=byte_size, default=None, metavar="BYTES",
                   help="cache size in bytes, e.g. 512M or 2G, when --num-blocks is not given (default: 80%% of the "
                        "free GPU memory, 512M on a CPU)")
    g.add_argument("--block-size", type=positive_int, default=_ENGINE_DEFAULTS["block_size"], metavar="N",
                   help="tokens per cache block (default: %(default)s)")
    g.add_argument("--max-num-seqs", type=positive_int, default=_ENGINE_DEFAULTS["max_num_seqs"], metavar="N",
                   help="most sequences in one engine step (default: %(default)s)")
    g.add_argument("--max-num-batched-tokens", type=positive_int,
                   default=_ENGINE_DEFAULTS["max_num_batched_tokens"], metavar="N",
                   help="token budget of one engine step, >= --max-num-seqs (default: %(default)s)")
    if max_model_len:
        g.add_argument("--max-model-len", type=positive_int, default=None, metavar="N",
                       help="context (prompt + output) per sequence (default: the model's and the cache's limit)")
    g.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction,
                   default=_ENGINE_DEFAULTS["enable_prefix_caching"],
                   help="reuse the cached blocks of equal prompt prefixes (default: on)")
    g.add_argument("--tensor-parallel-size", "--tp", type=positive_int, default=None, metavar="N",
                   help="under torchrun: split attention heads, vocabulary and MLPs over N ranks (default: the "
                        "world size / --ep)")
    g.add_argument("--expert-parallel-size", "--ep", type=positive_int, default=None, metavar="M",
                   help="under torchrun: split the routed experts over M ranks; --tp x --ep must equal the number "
                        "of processes (default: 1)")
    g.add_argument("--expert-exchange", choices=["all-to-all", "all-reduce"], default="all-to-all",
                   help="how tokens reach the experts with --ep > 1: all-to-all dispatch and combine, or each rank "
                        "runs its experts on all tokens and one all-reduce sums them, as the official demo does "
                        "(default: %(default)s)")
    g.add_argument("--speculative", choices=["mtp"], default=None,
                   help="speculative decoding: mtp = the model's MTP module drafts tokens and the model verifies them "
                        "all in one step; the same outputs (greedy) or the same distribution (sampling), in fewer "
                        "steps (default: off)")
    g.add_argument("--num-draft-tokens", type=positive_int, default=None, metavar="K",
                   help=f"with --speculative mtp: drafts per sequence and step, 1-{MAX_DRAFT_TOKENS}; past the "
                        f"model's MTP depths the last module drafts again from its own guess "
                        f"(default: {_ENGINE_DEFAULTS['num_draft_tokens']})")
    g.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                   help="fused MoE/MLA kernels and CUDA graphs for decode steps, GPU only (default: on with a "
                        "CUDA device and BF16 weights, off otherwise; --no-fast forces the plain PyTorch path)")


# A CPU model below this many parameters runs fastest on one thread: its matrices are too small to share out,
# and torch's threads spin against each other (and against anything else running) on a small, busy machine.
ONE_THREAD_BELOW_PARAMS = 200_000_000


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads for torch's operators (default: 1 on a CPU for a model below "
                        f"{ONE_THREAD_BELOW_PARAMS // 1_000_000}M parameters, such as the built-in model, where one "
                        "thread measured fastest; otherwise torch's own count, one per core)")


def set_threads(threads: int | None, device: str, num_params: int) -> int:
    """Apply `--threads` (or the default policy of `add_threads`); returns the thread count now in use."""
    import torch
    if threads is None and device == "cpu" and num_params < ONE_THREAD_BELOW_PARAMS:
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# ---- from flags to library objects ----------------------------------------------------------------
def resolve_model(model: str | None, chat: bool = False) -> Path:
    """The checkpoint folder `--model` names (an adapter folder: its merged checkpoint), or the built-in model
    when it is not given: the chat model with `chat`, else the base model."""
    from dsv3.checkpoint.adapter import is_adapter, materialize

    if model is None:
        import dsv3
        try:
            path = Path(dsv3.default_chat_model_path() if chat else dsv3.default_model_path())
        except FileNotFoundError as e:
            raise UsageError(f"no --model given and {e}") from None
        if not (path / "config.json").is_file():
            raise UsageError(f"no --model given and the default model folder {path} does not exist; pass --model DIR")
        return path
    path = Path(model)
    if not path.is_dir():
        raise UsageError(f"--model: folder not found: {path}")
    if is_adapter(path):
        try:
            return materialize(path)
        except (OSError, ValueError) as e:
            raise UsageError(f"--model: {e}") from None
    if not (path / "config.json").is_file():
        raise UsageError(f"--model: {path} has no config.json (expected an HF-format DeepSeek-V3 folder)")
    return path


def resolve_device(device: str | None) -> str:
    """`--device`, or cuda when available else cpu; a CUDA device that is not here is a UsageError."""
    import torch
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine")
        index = int(device[5:]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def engine_config(args: argparse.Namespace, device: str) -> EngineConfig:
    """The `EngineConfig` of the parsed flags (device already resolved): the one place flags meet the engine."""
    if args.fast and not device.startswith("cuda"):
        raise UsageError(f"--fast needs a CUDA device (--device cuda), got --device {device}")
    drafts = getattr(args, "num_draft_tokens", None)
    if drafts is not None and getattr(args, "speculative", None) is None:
        raise UsageError("--num-draft-tokens needs --speculative mtp")
    speculative = {"speculative": getattr(args, "speculative", None)}
    if drafts is not None:
        speculative["num_draft_tokens"] = drafts
    try:
        return EngineConfig(device=device, dtype=args.dtype, num_blocks=args.num_blocks, cache_memory=args.cache_memory,
                            block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                            max_num_batched_tokens=args.max_num_batched_tokens,
                            max_model_len=getattr(args, "max_model_len", None),
                            tensor_parallel_size=getattr(args, "tensor_parallel_size", None),
                            expert_parallel_size=getattr(args, "expert_parallel_size", None),
                            expert_exchange=getattr(args, "expert_exchange", "all-to-all"),
                            enable_prefix_caching=args.prefix_caching, fast=args.fast,
                            weights=getattr(args, "weights", "auto"), fp8_policy=getattr(args, "fp8_policy", None),
                            **speculative)
    except ValueError as e:  # settings that conflict with each other
        raise UsageError(str(e)) from None


def load_model(args: argparse.Namespace, path: Path, config: EngineConfig) -> Any:
    """The model of `--model` (resolved to `path`) on the engine's device and dtype, with `--weights` and
    `--fp8-policy`."""
    import dsv3

    from dsv3.model.fp8_linear import set_fp8_policy

    weights = getattr(args, "weights", "auto")
    model = dsv3.load_model(path, device=config.device, dtype=config.torch_dtype, weights=weights,
                            tp=config.tensor_parallel_size, ep=config.expert_parallel_size, moe=config.expert_exchange)
    set_fp8_policy(model, getattr(args, "fp8_policy", "auto"))
    return model


def fit_cpu_cache(config: EngineConfig, model: Any, lengths: list[int]) -> EngineConfig:
    """`config` with a CPU cache just big enough for sequences of `lengths` tokens running at once (at most
    `max_num_seqs` of them), when no size was given and that is below the engine's default CPU cache, which
    would otherwise be allocated whatever the model."""
    from dsv3.engine.model_runner import DEFAULT_CPU_CACHE_BYTES, cache_bytes_per_block

    if config.device != "cpu" or config.num_blocks is not None or config.cache_memory is not None:
        return config
    longest = -(-max(lengths) // config.block_size) + 1  # blocks of the longest sequence, plus one spare
    need = longest * min(len(lengths), config.max_num_seqs)
    if need * cache_bytes_per_block(model, config.block_size) >= DEFAULT_CPU_CACHE_BYTES:
        return config
    return dataclasses.replace(config, num_blocks=need)


def sampling_params(args: argparse.Namespace) -> "SamplingParams":
    """The engine's `SamplingParams` of the sampling flags."""
    from dsv3.engine.sampling import SamplingParams
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_new_tokens, seed=args.seed, min_p=args.min_p,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          repetition_penalty=args.repetition_penalty, stop=args.stop)
