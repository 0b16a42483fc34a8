"""LungMAE-FL core: the science, framework-free (never imports flwr).

DICOM -> volume in HU -> preprocessed sample -> 3D masked autoencoder -> ILD classifier -> metrics.
"""

__version__ = "0.1.0"
