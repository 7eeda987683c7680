"""Fast positional constructors for frozen, slotted dataclasses built per sequence (SequenceState, ScheduledSeq).

A frozen dataclass's generated __init__ sets each field through object.__setattr__ (to get past
its own frozen __setattr__) and takes keywords: 1.1-1.5 us a record on our CPU box. The scheduler
once built four per sequence per step; since its running set became columns (llmfx/running.py)
it builds them only where they are read. `positional_builder(cls)` returns a function that takes every field
positionally and stores each through its slot descriptor, which is what the slot assignment does
underneath anyway: 0.5-1.0 us (benchmarks/records.py, results/2026-11-29-cpu-records.json). The
object is the same class, equally frozen afterwards. It skips __post_init__, so use it only for
records without one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def positional_builder(cls: type[T]) -> Callable[..., T]:
    """build(*values) -> cls, values in field order; for frozen slotted dataclasses without __post_init__."""
    if not dataclasses.is_dataclass(cls) or "__slots__" not in cls.__dict__:
        raise TypeError(f"positional_builder needs a slotted dataclass, got {cls!r}")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__} has a __post_init__, which positional_builder would skip")
    names = [f.name for f in dataclasses.fields(cls)]
    scope: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    scope.update({f"_set_{n}": cls.__dict__[n].__set__ for n in names})
    body = "".join(f"    _set_{n}(o, {n})\n" for n in names)
    # Generated like dataclasses' own __init__: one plain function, no loop over fields per call.
    exec(f"def build({', '.join(names)}):\n    o = _new(_cls)\n{body}    return o\n", scope)
    build = scope["build"]
    build.__doc__ = f"{cls.__name__}({', '.join(names)}), all positional, without keyword parsing."
    return build
