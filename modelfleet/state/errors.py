"""Error values of the pure core: data, not exceptions, so a whole repo reports at once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class ManifestError:
    """One problem in the manifest repository, located as precisely as we can.

    Rendered as ``file:line: field: message (hint)`` so that editors and CI logs can jump to it.
    """

    file: str
    line: int
    field: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        text = f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        return f"{text} ({self.hint})" if self.hint else text

    def to_json(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "field": self.field,
            "message": self.message,
            "hint": self.hint,
            "text": str(self),
        }
