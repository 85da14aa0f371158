"""The one error a damaged or incomplete model gives: it names the file and the problem, in one line."""

from __future__ import annotations

from pathlib import Path


class ModelFileError(ValueError):
    """A model file or directory that cannot be used as it is (truncated, not the format it claims, lying
    about its own layout, lacking a part). `textcomplete serve` prints it and exits non-zero."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {problem}")
