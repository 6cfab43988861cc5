"""Synthetic surfaces, planted defects and datasets, for training and the tests.

The code lives on the device side, in edge_agent/demo/synthetic.py (numpy and OpenCV only), because
``edge-agent demo`` renders its conveyor from the same surfaces and the device package never imports
``training``. This module re-exports it under its old name.
"""

from __future__ import annotations

from edge_agent.demo.synthetic import (
    DEFECT_KINDS,
    DefectSample,
    SyntheticDataset,
    defect_image,
    good_image,
    good_surface,
    plant_defect,
    to_rgb,
    write_synthetic_dataset,
)

__all__ = [
    "DEFECT_KINDS",
    "DefectSample",
    "SyntheticDataset",
    "defect_image",
    "good_image",
    "good_surface",
    "plant_defect",
    "to_rgb",
    "write_synthetic_dataset",
]
