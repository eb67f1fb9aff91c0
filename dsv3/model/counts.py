"""Parameter counts from module shapes (built on the meta device, so even 671B costs no memory)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3.config import ModelArgs


@dataclass
class ParamCounts:
    main: int  # embedding + layers + final norm + head (what "671B" counts)
    mtp: int  # MTP modules without the shared embedding/head ("11.5B unique")
    mtp_with_copies: int  # as stored in the official files (embedding and head copied per MTP layer)
    activated: int  # per token in the main model: all but the unchosen routed experts, embedding included
    activated_no_embedding: int
    routed_experts: int  # all routed expert parameters of the main model

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def count_parameters(args: ModelArgs) -> ParamCounts:
    from dsv3.model.layers import skip_torch_init
    from dsv3.model.transformer import Transformer
    with torch.device("meta"), skip_torch_init():
        model = Transformer(args)

    def n(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    embed, head = n(model.embed_tokens), (0 if args.tie_word_embeddings else n(model.lm_head))
    main = embed + head + n(model.norm) + sum(n(layer) for layer in model.layers)
    mtp = sum(n(block) for block in model.mtp)
    routed = sum(n(layer.mlp.experts) for layer in model.layers if hasattr(layer.mlp, "experts"))
    active_routed = routed * args.n_activated_experts // max(args.n_routed_experts, 1)
    activated = main - routed + active_routed
    return ParamCounts(main=main, mtp=mtp, mtp_with_copies=mtp + args.num_nextn_predict_layers * (embed + n(model.lm_head)),
                       activated=activated, activated_no_embedding=activated - embed, routed_experts=routed)
