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

    def __post_init__(self) -> None:
        # Names read from bytes that are not UTF-8 (tar members, file names) or from JSON's
        # "\udXXX" escapes can hold lone surrogates, which cannot be printed or written as
        # UTF-8 (the trainer's skip report would crash): keep them escaped, as "\udcff".
        self.source, self.reason = _printable(self.source), _printable(self.reason)


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
