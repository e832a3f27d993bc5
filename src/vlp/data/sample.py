"""The record every reader yields, and how bad input is reported.

Readers never drop data silently: an unreadable sample becomes a `Skipped` record that the
collate function counts and the trainer reports at the end of each epoch, or, in strict mode,
a `DataError` that names the file (and line) at fault.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


class DataError(ValueError):
    """Bad input data; the message names the file, line or field at fault."""


@dataclass
class Sample:
    """One image with its captions and metadata (scene graph, labels, flags...)."""

    image: Image.Image
    captions: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # file path or shard#key, for error messages


@dataclass
class Skipped:
    """A sample that could not be read: where it came from and why."""

    source: str
    reason: str
