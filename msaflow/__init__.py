"""msaflow: raw talking-person videos to a trained, robust multimodal sentiment model.

The code lives in the repository's top-level folders and is imported under this name:
``msaflow.pipeline``, ``msaflow.extractors``, ``msaflow.model``, ``msaflow.datasets``.
"""

__version__ = "0.1.0"
