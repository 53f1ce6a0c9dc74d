"""Progress reporting without printing from library code.

Long-running library functions take a ``progress`` argument: a factory called as
``progress(description, total, unit)`` that returns a bar with ``update(n=1, **stats)`` and
``close()``. The default, :func:`silent`, does nothing; the CLI passes a tqdm-backed factory.
"""

from __future__ import annotations

from typing import Any, Protocol


class Bar(Protocol):
    def update(self, n: int = 1, **stats: Any) -> None: ...
    def close(self) -> None: ...


class ProgressFactory(Protocol):
    def __call__(self, description: str, total: int | None, unit: str = "it") -> Bar: ...


class _SilentBar:
    def update(self, n: int = 1, **stats: Any) -> None:
        pass

    def close(self) -> None:
        pass


def silent(description: str, total: int | None, unit: str = "it") -> Bar:
    """A progress factory that reports nothing (the library default)."""
    return _SilentBar()
