"""The DeepSeek-V3 decoder: embedding, `n_layers` blocks (first `n_dense_layers` dense, then MoE), final
norm, output head, and the MTP modules.

Names equal the HF names without the `model.` prefix (`embed_tokens`, `layers.{i}`, `norm`, `lm_head`);
MTP module k is `mtp.{k}` here and `model.layers.{n_layers + k}` in checkpoints (see
`dsv3.checkpoint.names`).

One forward, over flattened tokens: `hidden(tokens [N], positions [N], meta) -> [N, D]`, the final-normed
hidden states. `meta` (`dsv3.model.attention.AttentionMeta`) carries the attention backend: the engine's
paged cache (prefill, decode and mixed steps alike, captured in CUDA graphs on GPUs), or no cache at all.
`mtp_hidden` is the same for one MTP module. `forward(tokens [B, T])` is the thin wrapper for whole
sequences (training, scoring, tests): causal attention within each row, logits `[B, T, vocab]`, and with
`return_mtp=True` the MTP modules' logits.

Blocks pass the residual stream beside the block output (`x, residual`), so each RMSNorm adds and
normalises in one call (one kernel when fused). A decode plan in `meta` (`meta.plan`, set by the engine for CPU
decode steps) takes two sub-steps of every block, the attention (`MLA.forward`) and the FFN, and computes them
from its packed weights (`dsv3.engine.cpu_decode`).
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3.config import ModelArgs
from dsv3.model.attention import AttentionMeta, causal_meta
from dsv3.model.layers import MLP, RMSNorm, linear
from dsv3.model.mla import MLA
from dsv3.model.moe import Gate, MoE
from dsv3.model.rope import Rotary


class Block(nn.Module):
    """Pre-norm transformer block: `x + attn(norm(x))`, then `x + ffn(norm(x))`."""

    def __init__(self, layer_id: int, args: ModelArgs, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.input_layernorm = RMSNorm(args.dim, args.rms_norm_eps, dtype)
        self.self_attn = MLA(args, dtype, layer_id)
        self.post_attention_layernorm = RMSNorm(args.dim, args.rms_norm_eps, dtype)
        self.mlp: nn.Module = MoE(args, dtype) if args.is_moe_layer(layer_id) else MLP(args.dim, args.inter_dim, dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMeta) -> tuple[torch.Tensor, torch.Tensor]:
        """`x + residual` is the block's input stream (`residual` None: x alone); returns the FFN output and the
        stream before it, whose sum is the block's output. x `[N, D]`."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos, sin, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        if meta.plan is not None:  # CPU decode steps: the plan's packed experts (dsv3.engine.cpu_decode)
            return meta.plan.ffn(self, h), residual
        return self.mlp(h), residual


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
                meta: AttentionMeta) -> torch.Tensor:
        """emb `[N, D]` of the tokens k ahead, h_prev `[N, D]` -> normed hidden state `[N, D]`."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        x, residual = super().forward(x, None, cos, sin, meta)
        return self.shared_head.norm(x, residual)[0]


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

    # ---- the forward over flat tokens ---------------------------------------------------------
    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        """tokens `[N]`, positions `[N]` -> final-normed hidden states `[N, D]`."""
        cos, sin = self.rotary(positions)  # [N, R/2]
        x, residual = self.embed_tokens(tokens), None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, meta)
        return self.norm(x, residual)[0]

    def mtp_hidden(self, k: int, tokens: torch.Tensor, h_prev: torch.Tensor, positions: torch.Tensor,
                   meta: AttentionMeta) -> torch.Tensor:
        """MTP module k (0-based): tokens `[N]` (each one ahead of the position whose hidden state `h_prev
        [N, D]` is), positions `[N]` -> its normed hidden states `[N, D]`; logits are `lm_head` of them."""
        cos, sin = self.rotary(positions)
        return self.mtp[k](self.embed_tokens(tokens), h_prev, cos, sin, meta)

    # ---- whole sequences ---------------------------------------------------------------------
    def _rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """Positions `[B * T]` of `B` rows of `T` tokens that each start at 0."""
        bsz, seqlen = tokens.shape
        if seqlen > self.args.max_seq_len:
            raise ValueError(f"position {seqlen - 1} is beyond max_seq_len ({self.args.max_seq_len})")
        return torch.arange(seqlen, device=tokens.device).repeat(bsz)

    def forward(self, tokens: torch.Tensor, *, return_mtp: bool = False,
                absorb: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """tokens `[B, T]` -> logits `[B, T, vocab]` (float32 for float32 models, else the model dtype), each
        row attending causally to itself. `absorb`: attention in the latent space (the form decoding uses)
        instead of expanded keys and values through SDPA; equal up to rounding.

        `return_mtp=True` also returns, for each MTP depth k = 1..D, logits `[B, T - k, vocab]` where position
        t predicts token t + k + 1."""
        h = self.row_hidden(tokens, absorb)  # [B, T, D]
        logits = self.lm_head(h)
        if not return_mtp:
            return logits
        return logits, self.mtp_logits(tokens, h, absorb=absorb)

    def row_hidden(self, tokens: torch.Tensor, absorb: bool = False) -> torch.Tensor:
        """tokens `[B, T]` -> final-normed hidden states `[B, T, D]`, each row attending causally to itself."""
        bsz, seqlen = tokens.shape
        h = self.hidden(tokens.reshape(-1), self._rows(tokens), causal_meta(bsz, seqlen, absorb))  # [B * T, D]
        return h.view(bsz, seqlen, -1)

    def mtp_logits(self, tokens: torch.Tensor, h: torch.Tensor, absorb: bool = False) -> list[torch.Tensor]:
        """Training-time MTP: depth k sees `h_{k-1}(t)` `[B, T, D]` and the embedding of token t + k, t < T - k."""
        out = []
        bsz, seqlen = tokens.shape
        for k in range(1, len(self.mtp) + 1):
            n = seqlen - k
            if n <= 0:
                break
            h = self.mtp_hidden(k - 1, tokens[:, k:].reshape(-1), h[:, :n].reshape(bsz * n, -1),
                                self._rows(tokens[:, :n]), causal_meta(bsz, n, absorb)).view(bsz, n, -1)
            out.append(self.lm_head(h))
        return out
