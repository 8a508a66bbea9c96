"""Vendor error text as the tenant sees it: no credentials, bounded length."""

from __future__ import annotations

import pytest

from skinflint.providers.http import vendor_message


@pytest.mark.parametrize(("text", "shown"), [
    ("Incorrect API key provided: sk-proj-****abcd.", "Incorrect API key provided: [redacted]"),
    ("sent Bearer eyJhbGciOi.x-y_z", "sent [redacted]"),
    ("api_key=abc123&model=m", "[redacted]&model=m"),
    ("token: s3cr3t, retry", "[redacted], retry"),
    ("key AIzaSyD-abcdefghijklmno is invalid", "key [redacted] is invalid"),
    ("max_tokens: Field required", "max_tokens: Field required"),
    ("context length is 8192 tokens; sk- is a prefix", "context length is 8192 tokens; sk- is a prefix"),
])
def test_key_like_text_is_redacted(text: str, shown: str) -> None:
    assert vendor_message("p", 400, text) == shown
    assert vendor_message("p", 0, text) == shown  # a stream's error event has no status


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_credential_gets_a_fixed_sentence(status: int) -> None:
    assert vendor_message("openai", status, "sk-live-abcdef: revoked") == (
        "the upstream rejected the gateway's credentials for provider openai")


def test_long_vendor_text_is_shortened() -> None:
    shown = vendor_message("p", 500, "x" * 100_000)
    assert len(shown) == 503 and shown.endswith("...")
