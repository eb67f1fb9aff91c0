"""The DeepSeek-V3 network: MLA attention, DeepSeekMoE, MTP modules, YaRN rotary embedding."""

from dsv3.model.transformer import Transformer

__all__ = ["Transformer"]
