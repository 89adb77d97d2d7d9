"""Base class of every typed config model: unknown keys are errors, defaults live on the fields."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A pydantic model that forbids unknown keys and validates on assignment.

    Subclasses declare each field once with its default and a ``Field(description=...)`` giving its
    meaning and unit. Only plain dicts (``model_dump()``) cross process boundaries.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False,
                              protected_namespaces=())
