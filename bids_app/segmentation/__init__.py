"""Segmentation maths: residual maps, label-free calibration, lesion masks/tables, metrics.

Pure functions on model-space (or native-space) numpy arrays; the only file I/O is the
calibration JSON and the TSV tables, all written atomically via ``bids_app.bids.derivatives``.
"""
from bids_app.segmentation.calibration import Calibration, calibrate, probability_map, with_threshold
from bids_app.segmentation.lesions import lesion_mask, lesion_table, write_lesion_tsv
from bids_app.segmentation.metrics import evaluate, summarise, write_summary_tsv
from bids_app.segmentation.residuals import (ResidualSettings, analysis_region, residual_map, restrict,
                                             smooth)

__all__ = [
    "Calibration", "ResidualSettings", "analysis_region", "calibrate", "evaluate", "lesion_mask",
    "lesion_table", "probability_map", "residual_map", "restrict", "smooth", "summarise",
    "with_threshold", "write_lesion_tsv", "write_summary_tsv",
]
