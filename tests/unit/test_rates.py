"""The rate limit's arithmetic (GCRA as a reservation) and keys, without I/O."""

from __future__ import annotations

import msgspec
import pytest

from kapellmeister.agent import task
from kapellmeister.rates import Rate, bucket_key, reserve


def slots(rate: Rate, asked: list[float], tat: float | None = None) -> list[float]:
    """When runs asked for at these times may start, reserved one after the other."""
    starts = []
    for now in asked:
        start, tat = reserve(rate, tat, now)
        starts.append(start)
    return starts


def test_a_burst_of_limit_then_one_each_interval():
    rate = Rate(limit=5, per_s=1.0)  # five a second: one each 0.2 s once the burst is out
    assert slots(rate, [100.0] * 8) == pytest.approx([100] * 5 + [100.2, 100.4, 100.6])


def test_a_quiet_spell_gives_the_burst_back_and_no_more():
    rate = Rate(limit=3, per_s=3.0)  # one a second
    first = slots(rate, [0.0] * 3)
    assert first == [0.0, 0.0, 0.0]
    _, tat = reserve(rate, None, 0.0)
    for _ in range(2):
        _, tat = reserve(rate, tat, 0.0)
    later = slots(rate, [100.0] * 4, tat)
    assert later == pytest.approx([100, 100, 100, 101])


def test_a_replica_whose_clock_is_behind_cannot_hand_out_a_slot_again():
    rate = Rate(limit=5, per_s=1.0)
    tat = None
    starts = []
    # Two replicas take turns for 10 s of real time; B's clock is 4 s behind A's.
    for n in range(200):
        real = n * 0.05
        now = real if n % 2 == 0 else real - 4.0
        start, tat = reserve(rate, tat, now)
        starts.append(start if n % 2 == 0 else start + 4.0)  # on the real clock
    ran = sorted(starts)
    # In the 10 s, no more than the burst and 5 a second start (a bucket that trusted
    # each clock's "now" gave B's 4 s again at every turn: 200 here); and no 1 s holds
    # more than the burst and a second's worth.
    assert sum(1 for t in ran if t < 10.0) <= 5 + 5 * 10
    for first in ran:
        assert sum(1 for t in ran if first <= t < first + 1.0) <= 5 + 5


def test_keys_are_the_task_name_then_a_digest_of_the_keyed_field():
    plain = Rate(limit=1)
    assert bucket_key("mail.send", plain, {"customer": "acme"}) == "mail.send"
    keyed = Rate(limit=1, key="customer.id")
    acme = bucket_key("mail.send", keyed, {"customer": {"id": "acme corp."}})
    assert acme.startswith("mail.send.k.") and len(acme) == len("mail.send.k.") + 16
    assert acme != bucket_key("mail.send", keyed, {"customer": {"id": "globex"}})
    assert acme == bucket_key("mail.send", keyed, {"customer": {"id": "acme corp."}, "x": 1})
    same = Rate(limit=1, key="who")
    assert bucket_key("t", same, {"who": {"a": 1, "b": 2}}) == bucket_key(
        "t", same, {"who": {"b": 2, "a": 1}}
    )
    assert bucket_key("a.b", plain, {}) != bucket_key("a_b", plain, {})


class Mail(msgspec.Struct):
    customer: str


async def send(mail: Mail) -> Mail:
    return mail


def test_a_rate_is_checked_and_its_key_must_name_an_input_field():
    for wrong in (b'{"limit": 0}', b'{"limit": 1, "per_s": 0}', b'{"limit": 1, "per_s": 90000}'):
        with pytest.raises(msgspec.ValidationError):
            msgspec.json.decode(wrong, type=Rate)
    assert msgspec.json.decode(b'{"limit": 1, "later": 2}', type=Rate).limit == 1
    assert task("mail.send", send, rate=Rate(limit=1, key="customer")).rate is not None
    with pytest.raises(TypeError, match="'custmer'"):
        task("mail.send", send, rate=Rate(limit=1, key="custmer"))
