"""cliptune_export: turn a Hugging Face masked LM into the K+1 ONNX graphs cliptune-ort runs.

Needs the ``export`` extra (torch, transformers, onnx). Import name ``cliptune_export`` (the folder
``export/`` is mapped to it in pyproject.toml so it never shadows another package's ``export``).
"""

from .exporter import ExportError, ExportOptions, export_model

__all__ = ["ExportError", "ExportOptions", "export_model"]
