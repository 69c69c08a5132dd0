"""The stream's content on byte fixtures: whole events out of reads, and the usage event."""

from __future__ import annotations

import json

import pytest

from serving.gateway.exchange import Exchange
from serving.gateway.sse import EventFramer, data_event
from serving.gateway.tokens import UsageFilter, read_answer_usage
from tests.serving.conftest import DONE, NULL_USAGE, USAGE_ONLY, USAGE_WITH_CHOICE, WORD


def feed_all(pieces: list[bytes], events: int | None = None) -> list[bytes]:
    """What the framer hands out for each read; `events`: how many it must have counted."""
    framer = EventFramer()
    runs = [framer.feed(piece) for piece in pieces]
    assert events is None or framer.events == events
    return runs


def test_a_whole_event_is_passed_on_at_once_without_a_copy():
    framer = EventFramer()
    assert framer.feed(WORD) is WORD  # the first event is never held back for more


def test_an_event_split_across_reads_comes_out_whole_once_complete():
    a, b, c = WORD[:10], WORD[10:-1], WORD[-1:]  # the last read is the end's second newline
    assert feed_all([a, b, c], events=1) == [b"", b"", WORD]


def test_several_events_in_one_read_stay_one_run():
    framer = EventFramer()
    run = framer.feed(WORD + WORD + DONE)
    assert run == WORD + WORD + DONE and framer.events == 3
    assert framer.split(run) == [WORD, WORD, DONE]


def test_whole_events_go_on_and_the_incomplete_rest_waits():
    runs = feed_all([WORD + DONE[:5], DONE[5:] + WORD[:3], WORD[3:]], events=3)
    assert runs == [WORD, DONE, WORD]


def test_bytes_between_reads_join_up_exactly():
    stream = WORD + NULL_USAGE + USAGE_ONLY + DONE
    for size in (1, 2, 7, 64):
        pieces = [stream[i : i + size] for i in range(0, len(stream), size)]
        assert b"".join(feed_all(pieces, events=4)) == stream


def test_the_gateways_own_events_are_framed_alike():
    event = data_event(b'{"error":{}}')
    assert event == b'data: {"error":{}}\n\n' and EventFramer().feed(event) == event


def usage_filter(strip: bool) -> tuple[UsageFilter, Exchange]:
    exchange = Exchange("chat", "req-test")
    return UsageFilter(exchange, EventFramer(), strip), exchange


@pytest.mark.parametrize("run", [WORD, NULL_USAGE, WORD + NULL_USAGE + DONE])
def test_runs_without_a_usage_event_pass_unchanged(run):
    usage, exchange = usage_filter(strip=True)
    assert usage.filter(run) is run
    assert (exchange.prompt_tokens, exchange.completion_tokens) == (0, 0)


def test_the_usage_event_only_the_gateway_asked_for_is_read_and_dropped():
    usage, exchange = usage_filter(strip=True)
    assert usage.filter(USAGE_ONLY) == b"" and usage.dropped == 1
    assert (exchange.prompt_tokens, exchange.completion_tokens) == (3, 5)


def test_a_usage_event_the_client_asked_for_is_read_and_kept():
    usage, exchange = usage_filter(strip=False)
    assert usage.filter(USAGE_ONLY) == USAGE_ONLY and usage.dropped == 0
    assert (exchange.prompt_tokens, exchange.completion_tokens) == (3, 5)


def test_a_usage_event_with_choices_is_always_kept():
    usage, exchange = usage_filter(strip=True)
    assert usage.filter(USAGE_WITH_CHOICE) == USAGE_WITH_CHOICE
    assert (exchange.prompt_tokens, exchange.completion_tokens) == (2, 4)


def test_only_the_usage_event_leaves_a_run_in_order():
    usage, exchange = usage_filter(strip=True)
    assert usage.filter(WORD + NULL_USAGE + USAGE_ONLY + DONE) == WORD + NULL_USAGE + DONE
    assert exchange.tokens == 8


def test_a_malformed_usage_event_is_passed_on_as_it_is():
    usage, exchange = usage_filter(strip=True)
    broken = b'data: {"usage": {"prompt_tokens": 1\n\n'
    assert usage.filter(broken) == broken and exchange.tokens == 0


@pytest.mark.parametrize(
    ("body", "tokens"),
    [
        (json.dumps({"usage": {"prompt_tokens": 7, "completion_tokens": 2}}).encode(), (7, 2)),
        (json.dumps({"usage": {"prompt_tokens": None}}).encode(), (0, 0)),
        (json.dumps({"choices": []}).encode(), (0, 0)),
        (b'{"usage": ', (0, 0)),
        (b'["usage"]', (0, 0)),
    ],
)
def test_a_json_answers_usage(body, tokens):
    exchange = Exchange("completions", "req-test")
    read_answer_usage(exchange, body)
    assert (exchange.prompt_tokens, exchange.completion_tokens) == tokens
