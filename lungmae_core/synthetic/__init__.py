"""Synthetic data, the stand-in for hospitals in simulation, demos, tests and the experiment.

``anatomy``: the chest both phantom kinds share (body, bones, mediastinum, lungs, vessels and airways);
``scanners``: the simulated hospitals' scanner profiles and what acquisition does to the image;
``phantoms``: the built-in chest CT phantoms in HU (four classes);
``dicom_writer``: those phantoms written as real CT DICOM trees, the way a PACS export looks;
``experiment_phantoms``: the experiment's phantoms whose classes share one global lung-HU histogram.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import ModuleType

__all__ = ["source_digest"]


def source_digest(*modules: ModuleType) -> str:
    """SHA-256 (hex) of the modules' source files, in order.

    Generated phantoms are cached under a key that includes this digest of their generator (the phantom
    module and the anatomy and scanner modules it draws with), so a change to any of them redraws them
    instead of reusing phantoms an older generator made.
    """
    digest = hashlib.sha256()
    for module in modules:
        digest.update(Path(str(module.__file__)).read_bytes())
    return digest.hexdigest()
