"""Synthetic data, the stand-in for hospitals in simulation, demos, tests and the experiment.

``phantoms``: the built-in chest CT phantoms in HU (four classes, per-site scanner profiles);
``dicom_writer``: those phantoms written as real CT DICOM trees, the way a PACS export looks;
``experiment_phantoms``: the experiment's phantoms whose classes share one global lung-HU histogram.
"""
