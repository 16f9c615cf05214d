"""cliptune-ort: Clip-Tuning (derivative-free prompt learning with thinned networks) on ONNX Runtime.

The runtime imports numpy, onnxruntime, cma and tokenizers only; torch and transformers belong to
the export step (``cliptune_export``, the ``export`` extra).
"""

__version__ = "0.1.0"
