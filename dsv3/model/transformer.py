"""The DeepSeek-V3 decoder: embedding, `n_layers` blocks (first `n_dense_layers` dense, then MoE), final
norm, output head, and the MTP modules.

Names equal the HF names without the `model.` prefix (`embed_tokens`, `layers.{i}`, `norm`, `lm_head`);
MTP module k is `mtp.{k}` here and `model.layers.{n_layers + k}` in checkpoints (see
`dsv3.checkpoint.names`).

`forward(tokens, start_pos)` runs without a cache (causal attention over `tokens`) unless `setup_cache`
was called; with a cache it appends `tokens` at `start_pos` for every row and attends over the cache,
which gives incremental decoding. The engine instead passes `attention=` to run MLA over its own paged
cache.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dsv3.config import ModelArgs
from dsv3.model.layers import MLP, RMSNorm, linear
from dsv3.model.mla import MLA, LatentCache
from dsv3.model.moe import Gate, MoE
from dsv3.model.rope import Rotary

# attention(layer_id, mla, x [B, T, D], cos, sin) -> [B, T, D]; layer_id >= n_layers for MTP blocks
AttentionFn = Callable[[int, MLA, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Block(nn.Module):
    """Pre-norm transformer block: `x + attn(norm(x))`, then `x + ffn(norm(x))`."""

    def __init__(self, layer_id: int, args: ModelArgs, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.input_layernorm = RMSNorm(args.dim, args.rms_norm_eps, dtype)
        self.self_attn = MLA(args, dtype)
        self.post_attention_layernorm = RMSNorm(args.dim, args.rms_norm_eps, dtype)
        self.mlp: nn.Module = MoE(args, dtype) if args.is_moe_layer(layer_id) else MLP(args.dim, args.inter_dim, dtype)
        self.cache: LatentCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                start_pos: int = 0, absorb: bool = True, attention: AttentionFn | None = None) -> torch.Tensor:
        h = self.input_layernorm(x)
        if attention is not None:
            h = attention(self.layer_id, self.self_attn, h, cos, sin)
        else:
            h = self.self_attn(h, cos, sin, mask, self.cache, start_pos, absorb)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class SharedHead(nn.Module):
    """`shared_head.norm` of an MTP module (its `head` is the main model's `lm_head`, shared)."""

    def __init__(self, args: ModelArgs, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.norm = RMSNorm(args.dim, args.rms_norm_eps, dtype)


class MTPBlock(Block):
    """Multi-token prediction module k: `eh_proj([enorm(emb(x_{t+k})) ; hnorm(h_{k-1}(t))])`, one block,
    `shared_head.norm`; logits come from the shared output head."""

    def __init__(self, layer_id: int, args: ModelArgs, dtype: torch.dtype | None = None) -> None:
        super().__init__(layer_id, args, dtype)
        self.enorm = RMSNorm(args.dim, args.rms_norm_eps, dtype)
        self.hnorm = RMSNorm(args.dim, args.rms_norm_eps, dtype)
        self.eh_proj = linear(2 * args.dim, args.dim, dtype)
        self.shared_head = SharedHead(args, dtype)

    def forward(self, emb: torch.Tensor, h_prev: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, start_pos: int = 0, absorb: bool = True,
                attention: AttentionFn | None = None) -> torch.Tensor:
        """emb `[B, T, D]` of the tokens k ahead, h_prev `[B, T, D]` -> normed hidden state `[B, T, D]`."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        x = super().forward(x, cos, sin, mask, start_pos, absorb, attention)
        return self.shared_head.norm(x)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.args = args
        dtype = dtype or args.torch_dtype
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim, dtype=dtype)
        self.layers = nn.ModuleList(Block(i, args, dtype) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.rms_norm_eps, dtype)
        self.lm_head = linear(args.dim, args.vocab_size, dtype)
        self.mtp = nn.ModuleList(MTPBlock(args.n_layers + k, args, dtype)
                                 for k in range(args.num_nextn_predict_layers))
        self.rotary = Rotary(args)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    # ---- initialisation and caches -----------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for projections, embeddings and routers, ones for norms, zero correction
        bias; recomputes the rotary frequencies (a non-persistent buffer). Meta tensors are left alone."""
        std = self.args.init_std
        for module in self.modules():
            weight = getattr(module, "weight", None)
            if weight is not None and not weight.is_meta:
                if isinstance(module, RMSNorm):
                    weight.fill_(1.0)
                elif isinstance(module, (nn.Linear, nn.Embedding, Gate)):
                    weight.normal_(0.0, std)
            bias = getattr(module, "e_score_correction_bias", None)
            if bias is not None and not bias.is_meta:
                bias.zero_()
        self.rotary.reset()

    def blocks(self) -> list[Block]:
        return [*self.layers, *self.mtp]

    def setup_cache(self, max_batch: int, max_seq: int) -> None:
        """Give every block (MTP included) a contiguous latent cache; `forward` then appends at `start_pos`."""
        if max_seq > self.args.max_seq_len:
            raise ValueError(f"max_seq ({max_seq}) exceeds the model's max_seq_len ({self.args.max_seq_len})")
        weight = self.embed_tokens.weight
        for block in self.blocks():
            block.cache = LatentCache(self.args, max_batch, max_seq, weight.device, weight.dtype)

    def clear_cache(self) -> None:
        for block in self.blocks():
            block.cache = None

    @property
    def has_cache(self) -> bool:
        return self.layers[0].cache is not None

    # ---- forward ------------------------------------------------------------------------------
    def _positions(self, tokens: torch.Tensor, start_pos: int, positions: torch.Tensor | None) -> torch.Tensor:
        if positions is None:
            positions = torch.arange(start_pos, start_pos + tokens.shape[1], device=tokens.device)
            positions = positions.expand(tokens.shape[0], -1)
        if not positions.is_cuda and positions.numel() and int(positions.max()) >= self.args.max_seq_len:
            raise ValueError(f"position {int(positions.max())} is beyond max_seq_len ({self.args.max_seq_len})")
        return positions

    def _mask(self, seqlen: int, start_pos: int, device: torch.device, use_cache: bool) -> torch.Tensor | None:
        total = start_pos + seqlen if use_cache else seqlen
        if seqlen == 1:
            return None
        offset = total - seqlen
        q = torch.arange(seqlen, device=device)[:, None] + offset
        k = torch.arange(total, device=device)[None, :]
        return torch.zeros(seqlen, total, device=device).masked_fill(k > q, float("-inf"))  # [T, S]

    def hidden(self, tokens: torch.Tensor, start_pos: int = 0, *, positions: torch.Tensor | None = None,
               absorb: bool = True, attention: AttentionFn | None = None) -> torch.Tensor:
        """tokens `[B, T]` -> final-normed hidden states `[B, T, D]`."""
        positions = self._positions(tokens, start_pos, positions)
        cos, sin = self.rotary(positions)  # [B, T, rope/2]
        mask = None if attention is not None else self._mask(tokens.shape[1], start_pos, tokens.device, self.has_cache)
        h = self.embed_tokens(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, start_pos, absorb, attention)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, *, positions: torch.Tensor | None = None,
                absorb: bool = True, attention: AttentionFn | None = None,
                return_mtp: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """tokens `[B, T]` -> logits `[B, T, vocab]` (float32 for float32 models, else the model dtype).

        `return_mtp=True` also returns, for each MTP depth k = 1..D, logits `[B, T - k, vocab]` where position
        t predicts token t + k + 1 (training only: no cache)."""
        h = self.hidden(tokens, start_pos, positions=positions, absorb=absorb, attention=attention)
        logits = self.lm_head(h)
        if not return_mtp:
            return logits
        return logits, self.mtp_logits(tokens, h, absorb=absorb)

    def mtp_logits(self, tokens: torch.Tensor, h: torch.Tensor, absorb: bool = True) -> list[torch.Tensor]:
        """Training-time MTP: depth k sees `h_{k-1}(t)` and the embedding of token t + k, t < T - k."""
        out = []
        seqlen = tokens.shape[1]
        for k, block in enumerate(self.mtp, start=1):
            if seqlen - k <= 0:
                break
            n = seqlen - k
            positions = torch.arange(n, device=tokens.device).expand(tokens.shape[0], -1)
            cos, sin = self.rotary(positions)
            mask = self._mask(n, 0, tokens.device, use_cache=False)
            h = block(self.embed_tokens(tokens[:, k:]), h[:, :n], cos, sin, mask, 0, absorb)
            out.append(self.lm_head(h))
        return out

    def mtp_step(self, k: int, next_tokens: torch.Tensor, h_prev: torch.Tensor, start_pos: int = 0, *,
                 positions: torch.Tensor | None = None, absorb: bool = True,
                 attention: AttentionFn | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One MTP depth (0-based `k`) for drafting: -> (logits `[B, T, vocab]`, hidden `[B, T, D]`)."""
        positions = self._positions(next_tokens, start_pos, positions)
        cos, sin = self.rotary(positions)
        mask = None if attention is not None else self._mask(next_tokens.shape[1], start_pos, next_tokens.device,
                                                             self.mtp[k].cache is not None)
        h = self.mtp[k](self.embed_tokens(next_tokens), h_prev, cos, sin, mask, start_pos, absorb, attention)
        return self.lm_head(h), h
