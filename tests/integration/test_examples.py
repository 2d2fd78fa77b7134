"""The agent examples run in their --offline-demo form, as CI runs them: a tiny model that memorized
each example's run (plumbing, not quality) drives the real agent loop, and the printed output must
show the real thing happened: tools ran with the right arguments, per-node stats, burst sizes."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "agents"))

import multi_agent
import react_agent
import server_client
import streaming_callbacks

SUPERSCRIPTS = "⁰¹²³⁴⁵⁶⁷⁸⁹⁺"


def run(example, capsys, *args: str) -> str:
    assert example.main(["--offline-demo", *args]) == 0
    out = capsys.readouterr().out
    assert "OFFLINE DEMO: a tiny Gemma 4 that memorized this example's exact transcript" in out
    assert "tiny-gemma4-memorized-transcripts" in out  # the model's name says what it is
    return out


def test_help_says_the_offline_demo_is_a_memorizing_model(capsys) -> None:
    for example in (react_agent, multi_agent, streaming_callbacks, server_client):
        with pytest.raises(SystemExit):
            example.main(["--help"])
        assert "memorized this example's exact transcript" in " ".join(capsys.readouterr().out.split())


def test_react_agent_on_a_memorized_run_calls_both_tools_and_reports_every_model_call(capsys) -> None:
    check_react_run(run(react_agent, capsys))


def check_react_run(out: str) -> None:
    # The calls stream out of the model, the tools really run (21C -> 69.8F is computed, not printed from memory).
    assert '-> get_weather({"city": "Paris"})' in out and "<- get_weather returned sunny, 21C" in out
    assert '-> celsius_to_fahrenheit({"celsius": 21})' in out and "<- celsius_to_fahrenheit returned 69.8" in out
    assert "agent: It is sunny in Paris, at 21C, which is 69.8F." in out
    calls = re.findall(r"\[model call (\d)\] drafter=hybrid hint=(\w+) drafted=(\d+) accepted=(\d+)", out)
    assert [c[0] for c in calls] == ["1", "2", "3"] and calls[0][1] == "tool_call"
    assert all(int(accepted) <= int(drafted) for *_, drafted, accepted in calls)
    assert sum(int(c[3]) for c in calls) > 0  # the assistant's drafts were accepted


def test_server_client_runs_the_same_agent_against_gemma_mtp_serve(capsys) -> None:
    """The model runs in a `gemma-mtp serve` child process; the agent reaches it through base_url."""
    out = run(server_client, capsys)
    assert re.search(r"server: http://127\.0\.0\.1:\d+/v1", out)
    check_react_run(out)
    drafts = re.search(
        r"server metrics: spec_decode_num_drafts=(\d+), spec_decode_num_draft_tokens=(\d+), "
        r"spec_decode_num_accepted_tokens=(\d+)",
        out,
    )
    assert drafts and 0 < int(drafts[3]) <= int(drafts[2]) and int(drafts[1]) > 0


def test_multi_agent_on_a_memorized_run_hands_off_and_prints_per_node_acceptance(capsys) -> None:
    out = run(multi_agent, capsys)
    assert "[supervisor] ToCoder({'task': 'Write is_prime(n) for the utils module.'})" in out
    assert "[coder] ```python\ndef is_prime(n: int) -> bool:" in out
    assert "[supervisor] ToWriter(" in out and f"[writer] {multi_agent.OFFLINE_NOTE}" in out
    assert f"[supervisor] {multi_agent.OFFLINE_SUMMARY}" in out
    rows = re.findall(r"^(supervisor|coder|writer) +(\S+) +(\d+) +(\d+) +(\d+) +(\d+)% +([\d.]+)$", out, re.MULTILINE)
    assert [(node, hint, calls) for node, hint, calls, *_ in rows] == [
        ("supervisor", "tool_call", "3"),
        ("coder", "code", "1"),
        ("writer", "prose", "1"),
    ]
    for *_, drafted, accepted, percent, _per_forward in rows:
        assert int(drafted) > 0 and int(percent) == round(100 * int(accepted) / int(drafted))


def test_streaming_callbacks_on_a_memorized_run_mark_each_burst_with_its_size(capsys) -> None:
    out = run(streaming_callbacks, capsys)
    text = out.translate({ord(c): None for c in SUPERSCRIPTS})
    assert streaming_callbacks.OFFLINE_CODE in text and streaming_callbacks.OFFLINE_STORY in text
    totals = re.findall(r"^(\d+) tokens in (\d+) bursts \(one per target forward\), largest (\d+)$", out, re.MULTILINE)
    forwards = re.findall(r"hint=(\w+) .* forwards=(\d+)", out)
    assert [hint for hint, _ in forwards] == ["code", "long_form"]
    for (tokens, bursts, largest), (_, forward_count) in zip(totals, forwards, strict=True):
        assert int(bursts) == int(forward_count) and int(tokens) > int(bursts) and int(largest) > 1
    # The marks printed beside the text are those bursts, every one of them.
    marks = [
        int(n) for m in re.findall(f"[{SUPERSCRIPTS}]+", out) for n in m.translate(str.maketrans(SUPERSCRIPTS, "0123456789+")).split("+")
    ]
    assert sum(marks) == sum(int(t) for t, _, _ in totals)
