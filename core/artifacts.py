"""Stores of derived artifacts that the portal serves and the worker writes (torch-free)."""

from __future__ import annotations

from pathlib import Path

from core.config import Settings
from core.storage import ContentStore


def heatmap_store(settings: Settings) -> ContentStore:
    """Where Grad-CAM heat-map PNGs are kept (content-addressed, under the data folder)."""
    return ContentStore(Path(settings.data_dir) / "heatmaps", suffix=".png")
