"""Upstream providers behind the :class:`skinflint.interfaces.Provider` interface."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from skinflint.config import ProviderConfig
from skinflint.interfaces import Provider

__all__ = ["open_provider"]


def open_provider(name: str, cfg: ProviderConfig, session: aiohttp.ClientSession) -> Provider:
    """The provider ``cfg`` describes, sending its HTTP requests through ``session``."""
    from skinflint.providers.anthropic import AnthropicProvider
    from skinflint.providers.openai_compat import OpenAICompatProvider
    from skinflint.providers.replay import ReplayProvider

    if cfg.kind == "anthropic":
        return AnthropicProvider(name, base_url=cfg.base_url, api_key=cfg.api_key, session=session)
    if cfg.kind == "replay":
        data = Path(cfg.data_path) if cfg.data_path else None
        return ReplayProvider(name, latency_scale=cfg.latency_scale, data_path=data)
    return OpenAICompatProvider(
        name,
        base_url=cfg.base_url,
        api_key=cfg.api_key,
        session=session,
        headers=dict(cfg.headers),
        connect_timeout=cfg.connect_timeout,
    )
