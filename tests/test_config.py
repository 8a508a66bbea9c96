"""Settings given per feature, per route or as a default."""

from __future__ import annotations

from pydantic import BaseModel

from skinflint.config import Scoped


class Cap(BaseModel):
    max_tokens: int


def test_a_feature_wins_over_its_route_which_wins_over_the_default() -> None:
    scoped = Scoped[Cap].model_validate({
        "default": {"max_tokens": 1}, "features": {"docs": {"max_tokens": 2}},
        "routes": {"auto": {"max_tokens": 3}}})
    assert scoped.configured
    assert scoped.find("docs", "auto") == Cap(max_tokens=2)
    assert scoped.find("chat", "auto") == Cap(max_tokens=3)
    assert scoped.find("chat", "gpt-4o") == Cap(max_tokens=1)
    assert not Scoped[Cap]().configured and Scoped[Cap]().find("docs", "auto") is None
