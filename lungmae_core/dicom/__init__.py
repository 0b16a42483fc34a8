"""Index a DICOM tree from headers, choose the CT series worth training on and build volumes from geometry.

A hospital export is a folder tree of files with arbitrary names: several patients, studies and series,
scouts, dose screens, structured reports, DICOMDIR files and the odd text file. This package

1. reads the *headers only* of every file (:func:`read_header`, pixel data is never loaded) and groups the
   instances by (0020,000E) 'Series Instance UID' (:func:`index_tree`, in ``index.py``);
2. decides whether a series can become a chest CT volume (:func:`plan_series`): CT Image Storage (or
   Enhanced CT, whose frames are expanded from the functional groups into one image each), not a scout,
   pixel data present, intact and decodable, complete Image Plane module, one consistent geometry, axial,
   not tilted, enough slices, and a slice spacing that is uniform or can safely be made uniform
   (``selection.py``);
3. picks one series per study (:func:`choose_per_study`, rule: thinnest slice spacing, then most slices,
   then most pixels per slice, then the smallest Series Instance UID so that reruns agree);
4. assembles the volume from geometry, never from file order (:func:`load_series`): slices sorted by
   (0020,0032) 'Image Position (Patient)' projected on the slice normal from (0020,0037) 'Image
   Orientation (Patient)', spacing from the positions, HU from each slice's own Rescale Slope/Intercept
   (``assemble.py``).

Every refusal raises :class:`SeriesRejected` (``errors.py``), an :class:`~lungmae_core.errors.InvalidSeriesError`
with a short ``code`` (for counting in the data card) and a message in pydicom's "as <cause>" style that names
DICOM elements by tag and keyword and says how to fix it. Messages never hold UIDs, names or paths: the caller
prefixes them with the series' index or pseudonym.

References:
    DICOM PS3.3 A.3 (CT Image IOD), C.7.6.2 (Image Plane module), C.8.2.1 (CT Image module),
    C.11.1 (Modality LUT module), C.7.6.16 (Multi-frame Functional Groups), A.38 (Enhanced CT Image IOD).
"""

from lungmae_core.dicom.assemble import load_series
from lungmae_core.dicom.errors import REJECTION_CODES, SeriesRejected
from lungmae_core.dicom.index import (
    CT_IMAGE_STORAGE,
    ENHANCED_CT_IMAGE_STORAGE,
    DicomIndex,
    DicomSeries,
    FrameGeometry,
    InstanceHeader,
    SkippedFile,
    expand_frames,
    group_series,
    index_tree,
    is_nifti_path,
    read_header,
)
from lungmae_core.dicom.selection import SeriesRules, SlicePlan, choose_per_study, plan_series

__all__ = [
    "CT_IMAGE_STORAGE",
    "ENHANCED_CT_IMAGE_STORAGE",
    "REJECTION_CODES",
    "SeriesRejected",
    "SeriesRules",
    "InstanceHeader",
    "FrameGeometry",
    "SkippedFile",
    "DicomSeries",
    "DicomIndex",
    "SlicePlan",
    "read_header",
    "index_tree",
    "group_series",
    "expand_frames",
    "plan_series",
    "choose_per_study",
    "load_series",
    "is_nifti_path",
]
