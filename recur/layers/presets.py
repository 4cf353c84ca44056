"""Named layer patterns (hybrid presets) from the papers. A pattern repeats to the model's depth.

For linear/full-attention hybrids at any ratio use ``recur.hybrid(linear, ratio)`` or the
string pattern ``"hybrid:LINEAR:RATIO"``.
"""

from recur.registry import register_pattern

# Samba (Ren et al. 2024): Mamba layers interleaved with sliding-window attention (1:1).
register_pattern("samba", ("mamba", "swa"))
# Griffin (De et al. 2024): two residual blocks with the RG-LRU recurrent block, then one
# block with local (sliding-window) multi-query attention.
register_pattern("griffin", ("rglru", "rglru", "swa"))
# Hawk (De et al. 2024): RG-LRU recurrent blocks only.
register_pattern("hawk", ("rglru",))
# Lizard-style ("Lizard: An Efficient Linearization Framework for Large Language Models", 2025): gated linear attention for the global context,
# sliding-window attention for the local one, here as alternating layers.
register_pattern("gla_swa", ("gla", "swa"))
