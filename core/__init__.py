"""Shared core of the bone X-ray triage system.

Imported by the portal, the worker and the trainer; imports none of them. Everything that needs
torch lives in :mod:`core.ml`, which the portal never imports.
"""

#: The product's version: written here only (pyproject.toml reads it; the DICOM report states it).
__version__ = "0.1.0"
