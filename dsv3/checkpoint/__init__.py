"""HF-format checkpoints: the name table, streaming load, save in the same layout."""

from dsv3.checkpoint.load import load_model
from dsv3.checkpoint.save import save_model

__all__ = ["load_model", "save_model"]
