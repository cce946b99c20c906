"""A small generic registry for open sets (architectures, teacher loaders, optimizers)."""

from __future__ import annotations

import fnmatch
from typing import Callable, Generic, Iterator, TypeVar

from edgekd.errors import EdgeKDError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names to objects, filled with a decorator where each object is defined.

    Example:
        >>> archs = Registry("architecture")
        >>> @archs.register("tiny")
        ... def tiny(): ...
        >>> archs.get("tiny") is tiny
        True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            choices = ", ".join(sorted(self._items))
            raise EdgeKDError(f"unknown {self.kind} {name!r}; choose one of: {choices}") from None

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
