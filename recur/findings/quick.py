"""The smoke version of a finding's grid: the same runs at a few steps and a tiny width."""

from __future__ import annotations

from recur.config import SweepConfig


def quick_sweep(sweep: SweepConfig, steps: int = 4) -> SweepConfig:
    """``sweep`` at ``steps`` steps of batch 8, widths 16 (the number of widths kept), one eval batch,
    no early stop, the first seed and learning rate: it checks that every run of the grid trains,
    not what it finds."""
    data = sweep.model_dump()
    shared = {**data.get("shared", {}), "steps": steps, "batch_size": 8, "eval_batches": 1, "early_stop": None}
    sizes = [{**s.model_dump(), "d_model": 16 + 8 * i} for i, s in enumerate(sweep.sizes)]
    return SweepConfig.model_validate({**data, "shared": shared, "sizes": sizes, "seeds": sweep.seeds[:1],
                                       "lrs": sweep.lrs[:1] if sweep.lrs else None})
