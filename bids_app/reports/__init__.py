"""QC reports, built from the outputs only: ``sub-<label>.html`` per participant, the QC index
``index.html`` over every image (sortable, keyboard navigation, ratings exported as JSON/TSV) and
``group.html``.

The builders are called at the end of the levels (wrapped there so that a report failure is a
warning, never a failed run; the index is rebuilt with the participant pages) and can be rerun on
their own: ``python -m bids_app.reports OUTPUT_DIR``.
"""
from __future__ import annotations

from bids_app.reports.group import build_group_report
from bids_app.reports.index import build_index
from bids_app.reports.outputs import has_group_run
from bids_app.reports.participant import build_participant_reports

__all__ = ["build_group_report", "build_index", "build_participant_reports", "has_group_run"]
