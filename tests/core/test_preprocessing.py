"""The preprocessing value: validated when made, read back from the stored JSON form unchanged."""

from __future__ import annotations

import pytest
from torchvision.transforms import InterpolationMode

from core.preprocessing import INTERPOLATIONS, Preprocessing, PreprocessingError, default_preprocessing

#: A row as every version registered so far stores it (model_versions.preprocessing).
STORED = {"input_size": [3, 224, 224], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"}


def test_a_stored_row_reads_back_and_writes_the_same_json() -> None:
    preprocessing = Preprocessing.from_dict(STORED)
    assert preprocessing == default_preprocessing(224)
    assert (preprocessing.channels, preprocessing.height, preprocessing.width) == (3, 224, 224)
    assert preprocessing.to_dict() == STORED
    assert Preprocessing.from_dict({**STORED, "crop_pct": 1.0}) == preprocessing  # keys it does not use are ignored


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"interpolation": "lanczoz"}, "unknown preprocessing interpolation 'lanczoz'; use one of nearest"),
        ({"mean": [0.5, 0.5]}, "mean must have one value per channel"),
        ({"std": [0.5, 0.0, 0.5]}, "std must be positive"),
        ({"input_size": [3, 0, 224]}, "input_size must be"),
        ({"input_size": [3, 224]}, "input_size must be"),
        ({"mean": ["a", 0.5, 0.5]}, "must be numbers"),
    ],
)
def test_a_preprocessing_that_cannot_serve_is_refused_with_the_field_named(change: dict, message: str) -> None:
    with pytest.raises(PreprocessingError, match=message):
        Preprocessing.from_dict({**STORED, **change})


def test_a_missing_key_is_named() -> None:
    with pytest.raises(PreprocessingError, match="lacks std"):
        Preprocessing.from_dict({key: value for key, value in STORED.items() if key != "std"})


def test_the_interpolation_names_are_torchvisions() -> None:
    assert set(INTERPOLATIONS) == {mode.value for mode in InterpolationMode}
