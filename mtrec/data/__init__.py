"""Data readers and the ``Batch`` contract: synthetic generators, and the files path with its built-in schemas.

Every loader returns a :class:`DataBundle` (train/val/test :class:`TabularDataset`, a :class:`FeatureSpec`,
the task specs and a JSON-friendly ``meta`` dict) and takes keyword arguments with defaults, so Hydra
configs can call it through ``_target_``. Census-Income (:func:`load_census`) and AliExpress
(:func:`load_aliexpress`) are schemas (``mtrec/data/schemas/``) over the files path (:mod:`mtrec.data.files`):
one reader, one encoding for training and serving.
"""

from mtrec.data.aliexpress import load_aliexpress
from mtrec.data.batch import Batch, DataBundle, FeatureSpec, SparseFeature, TabularDataset
from mtrec.data.census import load_census
from mtrec.data.errors import DataError
from mtrec.data.synthetic import load_mmoe_synthetic, load_sparse_synthetic, mmoe_synthetic

__all__ = [
    "Batch",
    "DataBundle",
    "DataError",
    "FeatureSpec",
    "SparseFeature",
    "TabularDataset",
    "load_aliexpress",
    "load_census",
    "load_mmoe_synthetic",
    "load_sparse_synthetic",
    "mmoe_synthetic",
]
