"""The rules stage's configuration: answer rules, and their templates filled from a
regular-expression match, safely.

A template is text in which ``{0}`` stands for the whole match, ``{1}``, ``{2}``, ... for the
pattern's numbered groups and ``{name}`` for a named group; ``{{`` and ``}}`` are literal
braces. Nothing else is allowed in a field: no attribute or index access (``{0.x}``,
``{0[1]}``), no conversion (``!r``) and no format spec (``:>10``), so the client's text is only
ever copied, never formatted or looked into. Templates are parsed once, when the configuration
is read; filling one joins strings.
"""

from __future__ import annotations

import re
import string
from collections.abc import Collection
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["AnswerRule", "Template", "parse_template"]

_FORMATTER = string.Formatter()


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed template: literal text and the groups that follow each piece of it."""

    parts: tuple[tuple[str, int | str | None], ...]

    def fill(self, match: re.Match[str] | None) -> str:
        """The text with each field replaced by its group in ``match`` ("" when the group did
        not take part in the match, or with no match at all)."""
        out: list[str] = []
        for literal, group in self.parts:
            out.append(literal)
            if group is not None and match is not None:
                out.append(match.group(group) or "")
        return "".join(out)


def parse_template(text: str, groups: int, names: Collection[str]) -> Template:
    """``text`` parsed against a pattern with ``groups`` numbered groups and the named groups
    ``names``. Raises ValueError saying what is wrong."""
    try:
        pieces = list(_FORMATTER.parse(text))
    except ValueError as exc:
        raise ValueError(f"{exc}; write {{{{ and }}}} for literal braces") from None
    parts: list[tuple[str, int | str | None]] = []
    for literal, field, spec, conversion in pieces:
        if field is None:
            parts.append((literal, None))
            continue
        if spec or conversion:
            raise ValueError(f"{{{field}}}: a field takes no conversion or format spec")
        parts.append((literal, _group(field, groups, names)))
    return Template(tuple(parts))


def _group(field: str, groups: int, names: Collection[str]) -> int | str:
    if field.isdigit():
        if int(field) > groups:
            raise ValueError(f"{{{field}}}: the pattern has {groups} group(s)")
        return int(field)
    if field in names:
        return field
    if not field:
        raise ValueError("{}: name the group, as {0}, {1} or {name}")
    raise ValueError(f"{{{field}}}: the pattern has no group of that name")


class AnswerRule(BaseModel):
    """A deterministic answer (the rules stage): ``match`` (a regex searched in the last user
    message) or ``keywords`` (any of them, case-insensitive, as whole words) with an ``answer``
    that may name the match's groups (see :mod:`skinflint.templates`); or a ``table`` file
    (JSON or CSV) of exact questions and their answers. ``features`` and ``models``, when
    given, restrict it to requests of those features or asking for those models."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    match: str | None = None
    keywords: tuple[str, ...] = ()
    table: str | None = None
    answer: str | None = None
    features: tuple[str, ...] = ()
    models: tuple[str, ...] = ()

    @field_validator("match")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"regex does not compile: {exc}") from None
        return value

    @field_validator("keywords")
    @classmethod
    def _words(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not word.strip() for word in value):
            raise ValueError("a keyword is empty")
        return tuple(word.strip() for word in value)

    @model_validator(mode="after")
    def _one_kind(self) -> AnswerRule:
        kinds = [k for k in ("match", "keywords", "table") if getattr(self, k)]
        if len(kinds) != 1:
            raise ValueError("give exactly one of match, keywords or table")
        if self.table is None and self.answer is None:
            raise ValueError(f"answer: required with {kinds[0]}")
        if self.table is not None and self.answer is not None:
            raise ValueError("answer: a table rule takes its answers from the table")
        if self.answer is not None:
            self.template()  # raises on a field the pattern cannot fill
        return self

    def pattern(self) -> re.Pattern[str] | None:
        """What the rule searches the last user message for; None for a table rule."""
        if self.match is not None:
            return re.compile(self.match)
        if not self.keywords:
            return None
        words = sorted({re.escape(w) for w in self.keywords}, key=len, reverse=True)
        return re.compile(rf"(?<!\w)(?:{'|'.join(words)})(?!\w)", re.IGNORECASE)

    def template(self) -> Template | None:
        """The parsed ``answer``; None for a table rule."""
        pattern = self.pattern()
        if self.answer is None or pattern is None:
            return None
        try:
            return parse_template(self.answer, pattern.groups, pattern.groupindex)
        except ValueError as exc:
            raise ValueError(f"answer: {exc}") from None

