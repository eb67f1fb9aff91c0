"""Shared pieces of the LLM tests: a tiny random DeepSeek-V3 checkpoint written by `transformers`,
a word-level tokenizer for it, and `transformers`' greedy `generate` as the oracle."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from hf_models import make_v3

VOCAB = 256


def write_word_tokenizer(folder: Path) -> None:
    """tokenizer.json mapping token id i to the word `w{i}` (decode joins words with spaces)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))


class Oracle:
    """`transformers` greedy generation on one prompt at a time (no padding involved)."""

    def __init__(self, folder: Path) -> None:
        self.hf = make_v3(folder)
        self.hf.generation_config.eos_token_id = None
        self.hf.generation_config.pad_token_id = 0
        self._greedy = lru_cache(maxsize=None)(self._generate)

    def _generate(self, prompt: tuple[int, ...], max_new_tokens: int, eos: int | None) -> list[int]:
        with torch.no_grad():
            out = self.hf.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                   eos_token_id=eos)
        return out[0, len(prompt):].tolist()

    def greedy(self, prompt: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
        return self._greedy(tuple(prompt), max_new_tokens, eos)

    def log_softmax(self, tokens: list[int]) -> torch.Tensor:
        """Log-probabilities `[T, V]` of the next token after every prefix of `tokens`."""
        with torch.no_grad():
            return self.hf(torch.tensor([tokens])).logits[0].float().log_softmax(-1)


def random_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]
