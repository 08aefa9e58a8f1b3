"""QC reports: ``sub-<label>.html`` per participant and ``group.html``, built from the outputs only.

Both builders are called at the end of the levels (wrapped there so that a report failure is a
warning, never a failed run) and can be rerun on their own: ``python -m bids_app.reports OUTPUT_DIR``.
"""
from __future__ import annotations

from bids_app.reports.group import build_group_report
from bids_app.reports.outputs import has_group_run
from bids_app.reports.participant import build_participant_reports

__all__ = ["build_group_report", "build_participant_reports", "has_group_run"]
