"""Shared core of the bone X-ray triage system.

Imported by the portal, the worker and the trainer; imports none of them. Everything that needs
torch lives in :mod:`core.ml`, which the portal never imports.
"""

__version__ = "0.1.0"
