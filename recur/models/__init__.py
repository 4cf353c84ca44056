"""Assembly of mixers into blocks, backbones (layer patterns, hybrids) and language models."""

from recur.models.lm import MLP, Backbone, Block, CausalLM

__all__ = ["MLP", "Backbone", "Block", "CausalLM"]
