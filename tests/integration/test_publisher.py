"""The pipelined JetStream publisher, against a real nats-server."""

from __future__ import annotations

import asyncio

import nats.errors
import nats.js.errors
import pytest

from kapellmeister.publisher import Publisher, WrongLastSequence


@pytest.fixture
async def publisher(nc, js):
    await js.add_stream(name="PUB", subjects=["pub.>"])
    publisher = Publisher(nc)
    await publisher.start()
    yield publisher
    await publisher.stop()


async def test_many_in_flight_are_each_stored_and_acked_once(js, publisher):
    acks = await asyncio.gather(*(publisher.publish(f"pub.{n}", b"%d" % n) for n in range(2000)))
    assert sorted(a.seq for a in acks) == list(range(1, 2001))
    assert {a.stream for a in acks} == {"PUB"}
    assert (await js.get_msg("PUB", acks[1234].seq)).data == b"1234"


async def test_a_duplicate_message_id_is_acked_as_a_duplicate(publisher):
    first = await publisher.publish("pub.d", b"x", {"Nats-Msg-Id": "same"})
    again = await publisher.publish("pub.d", b"y", {"Nats-Msg-Id": "same"})
    assert (first.duplicate, again.duplicate, again.seq) == (False, True, first.seq)


async def test_an_expected_last_sequence_that_does_not_hold_is_a_wrong_last_sequence(js, publisher):
    first = await publisher.publish("pub.k", b"1", {"Nats-Expected-Last-Subject-Sequence": "0"})
    second = await publisher.publish(
        "pub.k", b"2", {"Nats-Expected-Last-Subject-Sequence": str(first.seq)}
    )
    with pytest.raises(WrongLastSequence):  # a compare-and-set that lost
        await publisher.publish(
            "pub.k", b"3", {"Nats-Expected-Last-Subject-Sequence": str(first.seq)}
        )
    assert (await js.stream_info("PUB")).state.last_seq == second.seq
    # nats-py's own type, so code written for kv.update catches it unchanged.
    assert issubclass(WrongLastSequence, nats.js.errors.KeyWrongLastSequenceError)


async def test_other_refusals_are_nats_py_api_errors(publisher):
    with pytest.raises(nats.js.errors.BadRequestError):
        await publisher.publish("pub.x", b"", {"Nats-Expected-Stream": "OTHER"})


async def test_no_stream_is_no_responders_and_no_ack_is_a_timeout(nc, publisher):
    with pytest.raises(nats.errors.NoRespondersError):
        await publisher.publish("nowhere", b"")
    silent = await nc.subscribe("silent")  # takes the message, never acks it
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(nats.errors.TimeoutError):
        await publisher.publish("silent", b"", timeout=0.5)
    assert 0.5 <= loop.time() - began < 1.5
    await silent.unsubscribe()


async def test_stop_fails_what_still_waits(nc, publisher):
    silent = await nc.subscribe("silent")
    waiting = asyncio.create_task(publisher.publish("silent", b""))
    await asyncio.sleep(0.1)
    await publisher.stop()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await waiting
    await silent.unsubscribe()


async def test_a_publish_after_stop_fails_at_once(publisher):
    await publisher.stop()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await asyncio.wait_for(publisher.publish("pub.late", b""), 1.0)


async def test_headers_arrive_as_nats_py_would_send_them(js, publisher):
    headers = {"Nats-Msg-Id": "h1", "traceparent": "00-ab-cd-01", "Kept": "a b"}
    ack = await publisher.publish("pub.h", b"body", headers)
    stored = await js.get_msg("PUB", ack.seq)
    assert (stored.data, {k: stored.headers[k] for k in headers}) == (b"body", headers)


async def test_values_needing_cleaning_are_cleaned_as_nats_py_does(js, publisher):
    ack = await publisher.publish("pub.c", b"x", {"Padded": " v ", "Broken": "a\r\nPUB x 1"})
    stored = await js.get_msg("PUB", ack.seq)
    assert (stored.headers["Padded"], stored.headers["Broken"]) == ("v", "a  PUB x 1")


async def test_bad_subjects_and_header_names_are_refused_as_nats_py_refuses_them(publisher):
    with pytest.raises(nats.errors.BadSubjectError):
        await publisher.publish("pub.a b", b"", {"Nats-Msg-Id": "s"})
    with pytest.raises(nats.errors.BadHeaderError):
        await publisher.publish("pub.n", b"", {"Bad Name": "v"})


async def test_publish_all_gives_each_message_its_ack_or_its_error_in_order(js, publisher):
    first = await publisher.publish("pub.k", b"1")
    outcomes = await publisher.publish_all(
        [
            ("pub.a", b"a", None),
            ("pub.k", b"2", {"Nats-Expected-Last-Subject-Sequence": "0"}),  # loses
            ("nowhere", b"", None),
            ("pub.b", b"b", {"Nats-Msg-Id": "b"}),
        ]
    )
    stored_a, lost, nowhere, stored_b = outcomes
    assert isinstance(lost, WrongLastSequence)
    assert isinstance(nowhere, nats.errors.NoRespondersError)
    assert not isinstance(stored_a, Exception) and not isinstance(stored_b, Exception)
    assert (await js.get_msg("PUB", stored_a.seq)).data == b"a"
    assert (await js.get_msg("PUB", stored_b.seq)).data == b"b"
    assert (await js.get_last_msg("PUB", "pub.k")).seq == first.seq  # the lost write wrote nothing
