"""The field's findings as runnable claims (``recur reproduce``); one file per finding.

    from recur.findings import FINDINGS, reproduce
    outcome = reproduce(FINDINGS.get("zoology-mqar").cls(), store)
"""

from recur.findings.base import FINDINGS, Finding, Measured, Outcome, Verdict, reproduce, write_section
from recur.findings import (  # noqa: F401 - registers each finding
    zoology_mqar, illusion_of_state, negative_eigenvalues, jrt, length_generalization, state_capacity, mingru_speed,
    rmt_segments, armt_capacity, brt_windows, tmaze_memory, looped_icl, scan_splits, test_time_compute, act_ponder, hrm_segments, relaxed_lora,
)

__all__ = ["FINDINGS", "Finding", "Measured", "Outcome", "Verdict", "reproduce", "write_section"]
