"""A faster pickle for slotted dataclasses, which cross to the format worker processes and back by
the dozen for every message.

``dataclasses`` gives a class with ``slots=True`` a generic ``__getstate__``/``__setstate__`` that
calls ``fields()`` again for every object pickled or rebuilt; about half the cost of pickling one
goes there. :func:`fast_pickle` reads the fields once per class and registers a reducer for it
(``copyreg``, as for a class of a library), so pickle and ``copy`` send the field values in order
and rebuild the object by setting its slots: what the generic path does, without looking the
fields up each time. Nothing else about the class changes (``__eq__``, ``__hash__``,
``dataclasses.replace`` are its own), and a subclass keeps the generic path.
"""

from __future__ import annotations

import copyreg
import dataclasses
import operator
import types
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# The setters of each registered class's slots, in the order of its fields.
_SETTERS: dict[type, tuple[Callable[[Any, Any], None], ...]] = {}


def fast_pickle(cls: type[T]) -> type[T]:
    """Class decorator (or a call, for a class defined elsewhere): pickle and copy ``cls``, a
    dataclass with ``slots=True``, by its field values. As with any pickle, the object is rebuilt
    without ``__init__`` (``__post_init__`` does not run again), frozen or not."""
    names = _field_names(cls)
    _SETTERS[cls] = _slot_setters(cls, names)
    get: Callable[[Any], tuple[Any, ...]]
    if len(names) > 1:
        get = operator.attrgetter(*names)
    elif names:
        (name,) = names
        get = lambda obj: (getattr(obj, name),)  # noqa: E731 (attrgetter of one name is no tuple)
    else:
        get = lambda obj: ()  # noqa: E731

    def reduce(obj: T) -> tuple[Callable[[type[T], tuple[Any, ...]], T], tuple[type[T], Any]]:
        return _rebuild, (cls, get(obj))

    copyreg.pickle(cls, reduce)
    return cls


def _rebuild(cls: type[T], values: tuple[Any, ...]) -> T:
    setters = _SETTERS.get(cls)
    if setters is None:  # rebuilt in a process that never registered it (nor needed to)
        setters = _SETTERS[cls] = _slot_setters(cls, _field_names(cls))
    obj = cls.__new__(cls)
    for set_slot, value in zip(setters, values, strict=True):
        set_slot(obj, value)
    return obj


def _field_names(cls: type) -> tuple[str, ...]:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"fast_pickle: {cls!r} is not a dataclass")
    return tuple(f.name for f in dataclasses.fields(cls))


def _slot_setters(cls: type, names: tuple[str, ...]) -> tuple[Callable[[Any, Any], None], ...]:
    """The ``__set__`` of each field's slot (a member descriptor, in the class or a base): it
    writes the slot directly, past the ``__setattr__`` of a frozen dataclass."""
    setters = []
    for name in names:
        slot = next((k.__dict__[name] for k in cls.__mro__ if name in k.__dict__), None)
        if not isinstance(slot, types.MemberDescriptorType):
            raise TypeError(
                f"fast_pickle: {cls.__qualname__}.{name} is not a slot (use slots=True)"
            )
        setters.append(slot.__set__)
    return tuple(setters)
