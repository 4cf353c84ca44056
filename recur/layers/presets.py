"""Named layer patterns (hybrid presets). A pattern repeats to the model's depth."""

from recur.registry import register_pattern

# Samba (Ren et al. 2024): Mamba layers interleaved with sliding-window attention.
register_pattern("samba", ("mamba", "swa"))
