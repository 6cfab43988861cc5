"""Precision calibration (INT8 Q/DQ, FP16) and the NFA false-alarm check."""
