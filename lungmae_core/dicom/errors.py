"""Why a DICOM file or series was refused: the rejection codes the data card counts, and the error that
carries one."""

from __future__ import annotations

from lungmae_core.errors import InvalidSeriesError

#: Every rejection code with what it means; the data card counts rejections by these codes.
REJECTION_CODES: dict[str, str] = {
    "not-dicom": "the file is not DICOM (no 'DICM' prefix after the 128-byte preamble)",
    "unreadable": "the file cannot be read (permissions or I/O error)",
    "truncated": "the file or its pixel data is shorter than its header says",
    "not-an-image": "a DICOM object that holds no image (DICOMDIR, report, ...)",
    "empty-folder": "a folder in the input tree holds no files",
    "inconsistent-series": "instances of one series disagree on patient, study or geometry",
    "not-ct": "the modality is not CT",
    "not-ct-image": "CT modality but not a CT Image Storage object (dose screen, secondary capture, ...)",
    "enhanced-ct": "multi-frame CT without functional groups: its frames cannot be placed",
    "scout": "a localizer/scout/topogram image",
    "no-pixel-data": "instances without (7FE0,0010) Pixel Data",
    "no-decoder": "compressed pixel data for which no decoder is installed",
    "decode-failed": "the pixel data could not be decoded",
    "no-geometry": "missing Image Position/Orientation (Patient) or Pixel Spacing",
    "no-rescale": "missing Rescale Slope/Intercept, so HU cannot be computed",
    "not-grayscale": "colour or multi-sample images",
    "not-axial": "oblique, coronal or sagittal slices",
    "tilted": "gantry tilt: slice positions drift sideways",
    "too-few-slices": "fewer slices than data.min-slices",
    "duplicate-positions": "two different slices at the same position",
    "missing-slices": "gaps in the slice positions too large to fill safely",
    "irregular-spacing": "slice spacing varies beyond data.spacing-tolerance",
    "not-chosen": "another series of the same study was chosen",
    "nifti-invalid": "a NIfTI file that is not a 3D CT volume in HU",
    "implausible-lungs": "lung volume or shape implausible for a chest CT (head/abdomen scan?)",
    "internal-error": "an unexpected error (a bug: please report it with the log)",
}


class SeriesRejected(InvalidSeriesError):
    """A series (or file) that cannot become a training sample, with a code from :data:`REJECTION_CODES`.

    Args:
        code: key of :data:`REJECTION_CODES`.
        message: the cause, phrased to follow "Unable to use series 3 of 12 as ...", without identifiers.
    """

    def __init__(self, code: str, message: str) -> None:
        assert code in REJECTION_CODES, code
        super().__init__(message)
        self.code = code

    def __reduce__(self) -> tuple[type[SeriesRejected], tuple[str, str]]:
        # keep the code across process boundaries (ProcessPoolExecutor pickles errors)
        return (type(self), (self.code, str(self)))
