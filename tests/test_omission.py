"""The pure helpers that place cheap-model output: system prompts replaced
(:mod:`skinflint.compression`), and what context and history trimming left out found and
summarised in its place (:mod:`skinflint.omission`)."""

from __future__ import annotations

from typing import Any

from skinflint import compression as cx
from skinflint import omission
from skinflint.tokens import TokenCounter

JSON = dict[str, Any]
TOKENS = TokenCounter()


def _count(text: str) -> int:
    return TOKENS.count_text("gpt-4o", text)


def test_replace_system_replaces_only_what_it_is_given_a_text_for() -> None:
    messages = [{"role": "system", "content": "long rules"},
                {"role": "developer", "content": "keep"},
                {"role": "user", "content": "long rules"}]
    out = cx.replace_system(messages, lambda t: "short" if t == "long rules" else None)
    assert out == [{"role": "system", "content": "short"}, messages[1], messages[2]]
    assert out[1] is messages[1] and messages[0]["content"] == "long rules"
    assert cx.replace_system(messages, lambda t: None) is messages
    assert cx.replace_system(messages, lambda t: t) is messages


PARAS = ["Oak benches were sold in March, twelve of them.",
         "The cat sleeps on the windowsill. It likes the sun. It purrs loudly all day.",
         "Teak tables were sold in April, eight of them.",
         "Painting the fence took three weekends."]


def test_context_omitted_finds_the_left_out_runs_and_the_place_of_the_first() -> None:
    text = "\n\n".join([*PARAS, "How many benches and tables were sold?"])
    before = [{"role": "system", "content": "s"}, {"role": "user", "content": text}]
    after = cx.trim_context(before, 30, _count)
    trimmed = after[1]["content"]
    assert trimmed != text
    omitted = omission.context_omitted(before, after)
    assert omitted is not None and omitted.index == 1
    gone = [p for p in PARAS if p not in trimmed]
    assert gone and all(p in omitted.text for p in gone)
    assert not any(p in omitted.text for p in PARAS if p in trimmed)
    summarised = omission.with_context_summary(after, omitted, " A cat, a fence. ")
    new = summarised[1]["content"]
    assert new.replace("[Summary of omitted text: A cat, a fence.]\n\n", "") == trimmed
    assert after[1]["content"] == trimmed and summarised[0] is after[0]


def test_context_omitted_places_the_summary_where_the_first_left_out_chunk_was() -> None:
    before = [{"role": "user", "content": "keep one\n\ndrop two\n\nkeep three\n\nquestion"}]
    after = [{"role": "user", "content": "keep one\n\nkeep three\n\nquestion"}]
    omitted = omission.context_omitted(before, after)
    assert omitted == omission.Omitted("drop two", 0, len("keep one\n\n"))
    out = omission.with_context_summary(after, omitted, "two")
    assert out[0]["content"] == (
        "keep one\n\n[Summary of omitted text: two]\n\nkeep three\n\nquestion")


def test_a_kept_sentence_of_a_cut_paragraph_is_not_counted_as_left_out() -> None:
    before = [{"role": "user", "content": "One. Two. Three.\n\nquestion"}]
    after = [{"role": "user", "content": "One. Three.\n\nquestion"}]
    omitted = omission.context_omitted(before, after)
    assert omitted is not None and omitted.text == "Two."
    assert after[0]["content"][omitted.offset:].startswith("Three.")


def test_nothing_left_out_is_nothing_to_summarise() -> None:
    messages = [{"role": "user", "content": "a\n\nb"}]
    assert omission.context_omitted(messages, messages) is None
    assert omission.history_omitted(messages, list(messages)) is None


def test_history_omitted_lists_the_dropped_turns_and_the_summary_takes_their_place() -> None:
    system = {"role": "system", "content": "rules"}
    old: list[JSON] = [{"role": "user", "content": "hi"},
           {"role": "assistant", "content": None,
            "tool_calls": [{"id": "1", "type": "function",
                            "function": {"name": "lookup", "arguments": "{}"}}]},
           {"role": "tool", "tool_call_id": "1", "content": "found"},
           {"role": "user", "content": [{"type": "text", "text": "parts"}]}]
    last: JSON = {"role": "user", "content": "now?"}
    before = [system, *old, last]
    after = [system, last]
    omitted = omission.history_omitted(before, after)
    assert omitted is not None and omitted.index == 1
    assert omitted.text == "user: hi\nassistant: (called lookup)\ntool: found\nuser: parts"
    out = omission.with_history_summary(after, omitted, "greetings")
    assert out == [system, {"role": "system",
                            "content": "[Summary of earlier conversation: greetings]"}, last]
