"""The stream's content on byte fixtures: whole events out of reads in any SSE line-end style,
and the token counts read on the way."""

from __future__ import annotations

import json

import pytest

from serving.gateway.exchange import Exchange
from serving.gateway.sse import EventFramer, data_event
from serving.gateway.tokens import Asked, UsageFilter, read_answer_usage
from tests.serving.conftest import (
    DONE,
    HEAD,
    NULL_USAGE,
    USAGE_ONLY,
    USAGE_WITH_CHOICE,
    WORD,
    counted,
    crlf,
)


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


# Three events as LF-framed bytes (one of two lines), and the same framed with other line ends:
# (line end, end of the blank line); CR then LF would be one CRLF line end, so it is not a style.
LF_EVENTS = b'data: {"a":1}\n\nid: 7\ndata: {"b":"x y"}\n\n' + DONE
STYLES = {
    "lf": (b"\n", b"\n"),
    "crlf": (b"\r\n", b"\r\n"),
    "cr": (b"\r", b"\r"),
    "crlf-then-lf": (b"\r\n", b"\n"),
    "lf-then-crlf": (b"\n", b"\r\n"),
    "lf-then-cr": (b"\n", b"\r"),
    "cr-then-crlf": (b"\r", b"\r\n"),
    "crlf-then-cr": (b"\r\n", b"\r"),
}


def framed(line_end: bytes, blank_end: bytes) -> bytes:
    events = LF_EVENTS.split(b"\n\n")[:-1]
    return b"".join(event.replace(b"\n", line_end) + line_end + blank_end for event in events)


@pytest.mark.parametrize("style", STYLES)
def test_every_line_end_style_gives_the_same_lf_events(style):
    stream = framed(*STYLES[style])
    assert feed_all([stream], events=3) == [LF_EVENTS]


@pytest.mark.parametrize("style", STYLES)
def test_a_stream_split_at_every_byte_comes_out_whole(style):
    stream = framed(*STYLES[style])
    for cut in range(1, len(stream)):  # including between a CR and its LF
        runs = feed_all([stream[:cut], stream[cut:]], events=3)
        assert b"".join(runs) == LF_EVENTS, cut
        assert all(run.endswith(b"\n\n") for run in runs if run)
    one_by_one = [stream[i : i + 1] for i in range(len(stream))]
    assert b"".join(feed_all(one_by_one, events=3)) == LF_EVENTS


def test_an_event_goes_out_once_its_blank_line_is_in_before_the_lf_of_a_crlf():
    # "\r\n\r" already ends the event; the LF that follows belongs to that last CR.
    runs = feed_all([b"data: a\r", b"\n\r", b"\ndata: b\r\n\r\n"], events=2)
    assert runs == [b"", b"data: a\n\n", b"data: b\n\n"]


def test_split_and_the_usage_filter_work_on_a_crlf_stream():
    framer = EventFramer()
    run = framer.feed(crlf(WORD + USAGE_ONLY + DONE))
    assert framer.split(run) == [WORD, USAGE_ONLY, DONE]
    exchange = Exchange("chat", "req-test")
    assert UsageFilter(exchange, framer, Asked(False, False)).filter(run) == WORD + DONE
    assert (exchange.prompt_tokens, exchange.completion_tokens) == (3, 5)


@pytest.mark.parametrize(
    ("tail", "flushed"),
    [
        (b"data: [DONE]", DONE),  # no line end at all
        (b"data: [DONE]\n", DONE),  # its line ended, its blank line missing
        (b"data: [DONE]\r\n", DONE),
        (b"data: [DONE]\r", DONE),
        (b"id: 1\r\ndata: x", b"id: 1\ndata: x\n\n"),
        (b"\n", b""),  # only a line end left: nothing to send
        (b"", b""),
    ],
)
def test_a_trailing_event_without_its_blank_line_is_flushed_whole_at_the_end(tail, flushed):
    framer = EventFramer()
    assert framer.feed(WORD) == WORD and framer.feed(tail) == b""
    assert framer.flush() == flushed
    assert framer.events == 1 + bool(flushed)
    assert framer.flush() == b""  # flushed once


NOTHING, FINAL, BOTH = Asked(False, False), Asked(True, False), Asked(True, True)


def usage_filter(asked: Asked = NOTHING) -> tuple[UsageFilter, Exchange]:
    exchange = Exchange("chat", "req-test")
    return UsageFilter(exchange, EventFramer(), asked), exchange


@pytest.mark.parametrize("run", [WORD, NULL_USAGE, WORD + NULL_USAGE + DONE])
def test_runs_without_a_usage_event_pass_unchanged(run):
    usage, exchange = usage_filter()
    assert usage.filter(run) is run
    assert (exchange.prompt_tokens, exchange.completion_tokens) == (0, 0)


def test_the_usage_event_only_the_gateway_asked_for_is_read_and_dropped():
    usage, exchange = usage_filter()
    assert usage.filter(USAGE_ONLY) == b"" and usage.dropped == 1
    assert (exchange.prompt_tokens, exchange.completion_tokens) == (3, 5)


def test_a_usage_event_the_client_asked_for_is_read_and_kept():
    usage, exchange = usage_filter(FINAL)
    assert usage.filter(USAGE_ONLY) == USAGE_ONLY and usage.dropped == 0
    assert (exchange.prompt_tokens, exchange.completion_tokens) == (3, 5)


def test_a_usage_event_with_choices_is_kept_without_the_usage_not_asked_for():
    usage, exchange = usage_filter()
    cut = USAGE_WITH_CHOICE.replace(b',"usage":{"prompt_tokens":2,"completion_tokens":4}', b"")
    assert usage.filter(USAGE_WITH_CHOICE) == cut
    assert (exchange.prompt_tokens, exchange.completion_tokens) == (2, 4)
    usage, _ = usage_filter(BOTH)
    assert usage.filter(USAGE_WITH_CHOICE) is USAGE_WITH_CHOICE


def test_only_the_usage_event_leaves_a_run_in_order():
    usage, exchange = usage_filter()
    assert usage.filter(WORD + NULL_USAGE + USAGE_ONLY + DONE) == WORD + NULL_USAGE + DONE
    assert exchange.tokens == 8


def test_a_malformed_usage_event_is_passed_on_as_it_is():
    usage, exchange = usage_filter()
    broken = b'data: {"usage": {"prompt_tokens": 1\n\n'
    assert usage.filter(broken) == broken and exchange.tokens == 0


def test_continuous_usage_is_read_from_every_run_and_cut_out_unless_asked_for():
    usage, exchange = usage_filter()
    assert usage.filter(counted(1)) == WORD
    assert (exchange.prompt_tokens, exchange.completion_tokens) == (3, 1)
    assert usage.filter(counted(2) + counted(3)) == WORD + WORD
    assert exchange.completion_tokens == 3  # the latest cumulative count: what was generated
    assert usage.filter(USAGE_ONLY + DONE) == DONE  # the backend's own total has the last word
    assert exchange.completion_tokens == 5 and not usage.settle()


def test_a_client_that_asked_for_the_final_usage_gets_it_and_no_per_chunk_usage():
    usage, exchange = usage_filter(FINAL)
    run = counted(1) + counted(2) + USAGE_ONLY + DONE
    assert usage.filter(run) == WORD + WORD + USAGE_ONLY + DONE
    assert exchange.tokens == 8 and usage.dropped == 0


def test_a_client_that_asked_for_continuous_usage_gets_the_stream_unchanged():
    usage, exchange = usage_filter(BOTH)
    run = counted(1) + counted(2) + USAGE_ONLY + DONE
    assert usage.filter(run) is run and exchange.tokens == 8


def test_several_choices_add_up_and_their_prompt_counts_once():
    usage, exchange = usage_filter(Asked(False, False, n=2, choices=2))
    usage.filter(counted(1, index=0) + counted(1, index=1) + counted(2, index=0))
    assert (exchange.prompt_tokens, exchange.completion_tokens) == (3, 3)
    usage.filter(counted(4, index=1))
    assert (exchange.prompt_tokens, exchange.completion_tokens) == (3, 6)


def test_several_prompts_each_count_their_prompt():
    usage, exchange = usage_filter(Asked(False, False, n=1, choices=2))
    usage.filter(counted(1, prompt=3, index=0) + counted(1, prompt=4, index=1))
    assert (exchange.prompt_tokens, exchange.completion_tokens) == (7, 2)


def test_a_stream_without_usage_is_counted_one_token_per_non_empty_delta():
    usage, exchange = usage_filter()
    role = HEAD + b'{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    text = b'data: {"choices":[{"index":0,"text": "w"}]}\n\n'
    for run in (role, WORD + WORD, NULL_USAGE, text, DONE):
        assert usage.filter(run) is run
    assert usage.settle() and (exchange.prompt_tokens, exchange.completion_tokens) == (0, 4)


def test_a_backend_with_only_a_final_usage_event_is_not_counted_from_content():
    usage, exchange = usage_filter()
    for run in (WORD, WORD, USAGE_ONLY + DONE):
        usage.filter(run)
    assert not usage.settle() and exchange.tokens == 8


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
