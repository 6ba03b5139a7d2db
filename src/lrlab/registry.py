"""Named things registered once: the config's allowed values and the "unknown X" errors derive
from here (the idea of timm's ``create_model`` registry).

    SCHEDULES = Registry("schedule", "train.schedule")

    @SCHEDULES.register("cosine")
    class Cosine(Schedule): ...

    SCHEDULES.get("cosine")          # the class; an unknown name raises LrlabError listing the valid ones
    config field: schedule: SCHEDULES.field() = "plateau"

:class:`Section` is the base of every config section (extra keys are errors), also of the
option sections that registered items declare next to themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, Any, Generic, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict

from lrlab.errors import LrlabError

T = TypeVar("T")


class Section(BaseModel):
    """A config section: typed keys with defaults; an unknown key or invalid value is an error."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Registry(Generic[T]):
    """Name -> object (a class, a builder function), in registration order.

    Args:
        what: what the names are, for messages ("schedule").
        key: the config key that takes these names ("train.schedule").
    """

    def __init__(self, what: str, key: str):
        self.what, self.key = what, key
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name`` (once)."""
        def decorate(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self._items[name] = obj
            return obj
        return decorate

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        """The names, in registration order."""
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def get(self, name: str) -> T:
        """The object registered as ``name``.

        Raises:
            LrlabError: ``name`` is not registered (the message lists the valid names).
        """
        if name not in self._items:
            raise LrlabError(self._unknown(name))
        return self._items[name]

    def field(self, *extra: str) -> Any:
        """A config field type: a str that must be one of the names (or of ``extra``, e.g. "auto")."""
        return choice(lambda: [*extra, *self.names()], self.what)

    def _unknown(self, name: object) -> str:
        return f"unknown {self.key} {name!r}; valid {self.what}s: {', '.join(self.names())}"


def choice(names: Callable[[], list[str]] | list[str] | tuple[str, ...], what: str) -> Any:
    """A pydantic field type: a str that must be one of ``names`` (a list, or a function giving one
    at validation time); the error names the value and lists the valid ones."""
    def check(value: str) -> str:
        valid = names() if callable(names) else list(names)
        if value not in valid:
            raise ValueError(f"{value!r} is not a valid {what}; valid: {', '.join(valid)}")
        return value
    return Annotated[str, AfterValidator(check)]
