"""Segmentation maths: residual maps, label-free calibration, lesion masks and tables, metrics.

Pure functions on numpy arrays, plus the calibration file and the TSV tables (written atomically
through ``bids_app.io``).
"""
