"""``compression.<scope>``: the cheap-model keys (``system_prompt.rewrite_with``,
``context.summarize_with``, ``history.summarize_with`` and their bounds), validated at start
with errors that name the key."""

from __future__ import annotations

from typing import Any

import pytest

from skinflint.config import settings_from_dict
from skinflint.errors import ConfigError

BASE: dict[str, Any] = {"providers": {"p": {"base_url": "http://127.0.0.1:9/v1"}},
                        "models": {"mini": {"provider": "p"}}}


def _settings(compression: dict[str, Any]) -> Any:
    return settings_from_dict({**BASE, "compression": compression}, env={})


def test_the_models_and_their_bounds_are_read_with_defaults() -> None:
    settings = _settings({"features": {"docs": {
        "system_prompt": {"rewrite_with": "mini"},
        "context": {"max_tokens": 2000, "summarize_with": "mini"},
        "history": {"max_tokens": 4000, "summarize_with": "mini", "summary_max_tokens": 100,
                    "summary_timeout": 2.5}}}})
    docs = settings.compression.find("docs", "x")
    assert docs is not None and docs.context is not None and docs.history is not None
    assert docs.system_prompt.min_tokens == 500
    assert (docs.context.summary_max_tokens, docs.context.summary_timeout) == (256, 10.0)
    assert (docs.history.summary_max_tokens, docs.history.summary_timeout) == (100, 2.5)
    assert docs.models() == [("system_prompt.rewrite_with", "mini"),
                             ("context.summarize_with", "mini"),
                             ("history.summarize_with", "mini")]


@pytest.mark.parametrize(("policy", "key"), [
    ({"context": {"max_tokens": 1000, "summarize_with": "nope"}},
     r"compression\.routes\.auto\.context\.summarize_with: unknown model 'nope'"),
    ({"history": {"max_tokens": 1000, "summarize_with": "nope"}},
     r"compression\.routes\.auto\.history\.summarize_with: unknown model 'nope'"),
    ({"system_prompt": {"rewrite_with": "nope"}},
     r"compression\.routes\.auto\.system_prompt\.rewrite_with: unknown model 'nope'"),
])
def test_an_unknown_model_is_named_by_its_key(policy: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        _settings({"routes": {"auto": policy}})


@pytest.mark.parametrize(("policy", "key"), [
    ({"context": {"max_tokens": 10, "summary_max_tokens": 0}}, "summary_max_tokens"),
    ({"history": {"max_tokens": 10, "summary_timeout": 0}}, "summary_timeout"),
    ({"history": {"max_tokens": 10, "summarise_with": "mini"}}, "summarise_with"),
    ({"context": {"max_tokens": 10, "summarize_with": ""}}, "summarize_with"),
    ({"context": {"max_tokens": 256, "summarize_with": "mini"}},
     r"context: summary_max_tokens \(256\) must be less than max_tokens \(256\)"),
    ({"history": {"max_tokens": 100, "summarize_with": "mini", "summary_max_tokens": 100}},
     r"history: summary_max_tokens \(100\) must be less than max_tokens"),
    ({"system_prompt": {"min_tokens": -1}}, "min_tokens"),
])
def test_a_bad_value_is_named_by_its_key(policy: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        _settings({"default": policy})
