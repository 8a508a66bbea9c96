"""Reading the text out of OpenAI chat messages."""

from __future__ import annotations

from typing import Any

__all__ = ["content_text", "last_user_text"]


def content_text(content: Any) -> str:
    """A message's ``content``: a string, or the text parts of a part list joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content
                         if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def last_user_text(messages: Any) -> str:
    """The text of the last user message, or "" when there is none."""
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return content_text(message.get("content"))
    return ""
