"""dsv3 as a model of lm-evaluation-harness (`pip install -e ".[lm-eval]"`): the `LM` class `DSV3LM`, registered
as `dsv3` when this module is imported, so the harness's tasks run on dsv3 checkpoints:

    import dsv3.eval.lm_eval_backend  # registers "dsv3" (lm-eval's own `lm_eval` command does not import it)
    lm_eval.simple_evaluate(model="dsv3", model_args="pretrained=PATH,dtype=float32", tasks=[...])
    lm_eval.simple_evaluate(model=DSV3LM(model=loaded_model, tokenizer=tok), tasks=[...])
    dsv3 eval --harness lm-eval --tasks hellaswag,arc_easy [--include-path DIR]

The three request kinds run on dsv3's own evaluation code, so a task scores here as `dsv3 eval` scores it:
- `loglikelihood(context, continuation)`: `multiple_choice.pair_span` (the harness's split of context and
  continuation, BOS first) through `perplexity.score_spans`, batched by length; returns (log-likelihood,
  every continuation token greedy);
- `loglikelihood_rolling(text)`: the sliding windows of `perplexity.document_spans` (BOS first, window
  `max_length`, stride `max_length // 2`), summed;
- `generate_until(context, {until, max_gen_toks, ...})`: the engine's continuous batching through
  `generation.GreedyGenerator`, grouped by stop strings and length; greedy only (the harness's generation
  tasks ask for greedy decoding; `do_sample=True` is refused).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (the built-in names, registered lazily, before ours: else lm-eval skips them)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from dsv3.eval.multiple_choice import pair_span
from dsv3.eval.perplexity import document_spans, prefix_token, score_spans

_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_model("dsv3")
class DSV3LM(LM):
    """lm-eval's view of a dsv3 model: `pretrained` (a checkpoint folder; default the built-in model) or an
    already loaded `model` with its `tokenizer`."""

    def __init__(self, pretrained: str | None = None, model: Any = None, tokenizer: Any = None,
                 device: str | None = None, dtype: str = "auto", batch_size: int | str = 8,
                 max_length: int | None = None, max_batch_size: int | None = None, progress: bool = True,
                 engine_config: Any = None, **unused: Any) -> None:
        super().__init__()
        from dsv3.eval.generation import GreedyGenerator
        if model is None:
            import dsv3
            from dsv3.tokenizer import load_tokenizer
            path = Path(pretrained) if pretrained else Path(dsv3.__file__).parent / "assets" / "default-model"
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"pretrained={path}: not a checkpoint folder (no config.json)")
            if dtype not in _DTYPES:
                raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            torch_dtype = _DTYPES[dtype] or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
            model = dsv3.load_model(path, device=device, dtype=torch_dtype)
            tokenizer = load_tokenizer(path)
        elif tokenizer is None:
            raise ValueError("DSV3LM(model=...) needs its tokenizer too")
        self.model, self.tok = model, tokenizer
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.max_length = min(int(max_length or model.args.max_seq_len), model.args.max_seq_len)
        self.progress = progress
        self.generator = GreedyGenerator(model, tokenizer, max_len=self.max_length, progress=progress,
                                         config=engine_config)
        self._device = next(model.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        return "dsv3"

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tok.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    # ---- the three request kinds ---------------------------------------------------------
    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        spans = [pair_span(self.tok, context, continuation, self.max_length)
                 for context, continuation in (r.args for r in requests)]
        scores = score_spans(self.model, spans, batch_size=self.batch_size, desc="loglikelihood",
                             progress=self.progress and not disable_tqdm)
        out = [(s.logprob, bool(s.greedy)) for s in scores]
        for r, result in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", r.args, result)
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        prefix = prefix_token(self.tok)
        stride = max(1, self.max_length // 2)
        spans, owner = [], []
        for i, r in enumerate(requests):
            ids = self.tok.encode(r.args[0], add_special_tokens=False)
            for span in document_spans(ids, prefix, self.max_length, stride):
                spans.append(span)
                owner.append(i)
        scores = score_spans(self.model, spans, batch_size=self.batch_size, desc="loglikelihood_rolling",
                             progress=self.progress and not disable_tqdm)
        totals = [0.0] * len(requests)
        for i, s in zip(owner, scores):
            totals[i] += s.logprob
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            kwargs = dict(r.args[1]) if len(r.args) > 1 and r.args[1] else {}
            if kwargs.get("do_sample") or (kwargs.get("temperature") or 0) > 0:
                raise ValueError("the dsv3 lm-eval backend decodes greedily; this task asks for sampling "
                                 f"({kwargs})")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks") or 256)
            groups[(tuple(until), max_new)].append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=not self.progress or disable_tqdm)
        for (until, max_new), idx in groups.items():
            texts = self.generator([requests[i].args[0] for i in idx], max_new, until)
            for i, text in zip(idx, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
            bar.update(len(idx))
        bar.close()
        return out  # type: ignore[return-value]
