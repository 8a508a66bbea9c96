"""``compression.<scope>.shadow``: the shadow guard's settings, validated at start with errors
that name the key, and found per request as the compression setting is."""

from __future__ import annotations

from typing import Any

import pytest

from skinflint.config import ShadowPolicy, settings_from_dict
from skinflint.errors import ConfigError
from skinflint.gateway import shadow_policies

PROVIDERS = {"p": {"base_url": "http://127.0.0.1:9/v1"}}


def _settings(compression: dict[str, Any], **extra: Any) -> Any:
    return settings_from_dict({"providers": PROVIDERS, "compression": compression, **extra},
                              env={})


def test_defaults_and_bounds() -> None:
    assert ShadowPolicy() == ShadowPolicy(sample=0.05, floor=0.9, judge="similarity",
                                          min_samples=20)
    with pytest.raises(ConfigError, match=r"compression\.features\.docs\.shadow\.sample"):
        _settings({"features": {"docs": {"shadow": {"sample": 1.5}}}})
    with pytest.raises(ConfigError, match=r"compression\.default\.shadow\.min_samples"):
        _settings({"default": {"shadow": {"min_samples": 0}}})


def test_a_judge_model_must_be_one_the_gateway_can_call() -> None:
    with pytest.raises(ConfigError, match=r"compression\.routes\.auto\.shadow\.judge: unknown model 'gpt-x'"):
        _settings({"routes": {"auto": {"shadow": {"judge": "gpt-x"}}}})
    models = {"gpt-x": {"provider": "p"}}
    assert _settings({"default": {"shadow": {"judge": "gpt-x"}}}, models=models)
    assert _settings({"default": {"shadow": {"judge": "gpt-y"}}}, default_provider="p")


def test_a_feature_takes_its_own_compression_setting_whole() -> None:
    assert shadow_policies(_settings({"features": {"docs": {}}})) is None
    find = shadow_policies(_settings({"default": {"shadow": {"sample": 0.5}},
                                      "features": {"quiz": {}}}))
    assert find is not None
    assert find("docs", "gpt-4o") == ShadowPolicy(sample=0.5)
    assert find("quiz", "gpt-4o") is None  # its own setting, without shadow
