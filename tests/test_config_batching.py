"""The batching section: defaults, deferrable features, and errors that name the key."""

from __future__ import annotations

import pytest

from skinflint.config import settings_from_dict
from skinflint.errors import ConfigError


def test_defaults_and_deferrable_features() -> None:
    settings = settings_from_dict({"batching": {"features": {"nightly": {"deferrable": True},
                                                             "live": {}}}}, env={})
    b = settings.batching
    assert (b.window_seconds, b.max_lines, b.poll_seconds, b.on_failure, b.webhook,
            b.keep_days) == (60.0, 50_000, 30.0, "realtime", None, 7.0)
    assert b.deferrable("nightly") and not b.deferrable("live") and not b.deferrable("")
    assert "nightly" in settings.feature_names()
    assert settings.providers["openai"].batch_discount == 0.5


@pytest.mark.parametrize(("section", "message"), [
    ({"on_failure": "retry"}, "batching.on_failure: must be 'realtime' or 'fail'"),
    ({"poll_seconds": 0}, "batching.poll_seconds: must be > 0"),
    ({"keep_days": 0}, "batching.keep_days: must be > 0"),
    ({"keep_days": -1.5}, "batching.keep_days: must be > 0"),
    ({"keep_days": "a week"}, "batching.keep_days: must be a number"),
    ({"max_lines": 60000}, "batching.max_lines: must be <= 50000"),
    ({"webhook": "ftp://x"}, "batching.webhook: must be an http:// or https:// URL"),
    ({"features": {"f": {"deferable": True}}}, "batching.features.f.deferable: unknown key"),
    ({"windows": 3}, "batching.windows: unknown key"),
])
def test_errors_name_the_key(section: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        settings_from_dict({"batching": section}, env={})
    assert str(raised.value) == f"config: {message}"
