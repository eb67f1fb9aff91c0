"""The one table between HF checkpoint names and `Transformer` state-dict keys.

Ours are the HF names without the `model.` prefix, except the MTP modules: checkpoint layer
`model.layers.{n_layers + k}` is our `mtp.{k}`. The official checkpoint also stores, in each MTP layer,
copies of the shared embedding and head (`embed_tokens.weight`, `shared_head.head.weight`); they map to
nothing here (`SHARED_COPIES`) and are written back as copies on save.
"""

from __future__ import annotations

import re

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_MTP = re.compile(r"^mtp\.(\d+)\.(.+)$")
SHARED_COPIES = {"embed_tokens.weight": "embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}


def hf_to_ours(name: str, n_layers: int) -> str:
    """`model.layers.61.enorm.weight` -> `mtp.0.enorm.weight` (for n_layers=61); `model.norm.weight` ->
    `norm.weight`; `lm_head.weight` stays. MTP copies of shared tensors map to `mtp.{k}.<name>` too (the
    caller recognises them with `shared_copy_of`)."""
    m = _LAYER.match(name)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        return f"layers.{layer}.{rest}" if layer < n_layers else f"mtp.{layer - n_layers}.{rest}"
    return name[len("model."):] if name.startswith("model.") else name


def ours_to_hf(key: str, n_layers: int) -> str:
    m = _MTP.match(key)
    if m:
        return f"model.layers.{n_layers + int(m.group(1))}.{m.group(2)}"
    return key if key == "lm_head.weight" else f"model.{key}"


def shared_copy_of(key: str) -> str | None:
    """For `mtp.{k}.embed_tokens.weight` / `mtp.{k}.shared_head.head.weight`, the main tensor they copy."""
    m = _MTP.match(key)
    return SHARED_COPIES.get(m.group(2)) if m else None


def mtp_depth(key: str) -> int | None:
    m = _MTP.match(key)
    return int(m.group(1)) if m else None
