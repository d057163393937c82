"""ONNX serving: the Triton-layout model repository (:mod:`serving.repository`), export of a model's export
view into it (:mod:`serving.export`), and the Open Inference Protocol server (:mod:`serving.server`, whose
docstring maps its modules; the ``mtlib-serve`` command line is :mod:`serving.cli`).

The export names are importable from here (``from serving import export_to_repository``) without making
``import serving`` load torch: they are resolved on first access.
"""

from __future__ import annotations

from typing import Any

_EXPORT_NAMES = (
    "ExportError",
    "ExportResult",
    "ExportView",
    "ParityError",
    "ParityOptions",
    "ParityReport",
    "ServingOptions",
    "TensorSpec",
    "check_parity",
    "export_onnx",
    "export_to_repository",
)


def __getattr__(name: str) -> Any:
    if name in _EXPORT_NAMES:
        from serving import export

        return getattr(export, name)
    raise AttributeError(f"module 'serving' has no attribute {name!r}")
