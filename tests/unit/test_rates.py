"""The token bucket's arithmetic and keys (`kapellmeister.rates`), without I/O."""

from __future__ import annotations

import msgspec
import pytest

from kapellmeister.rates import Rate, bucket_key, take


def test_a_full_bucket_lets_a_burst_run_then_one_every_interval():
    rate = Rate(limit=5, per_s=1.0)  # five a second: one every 0.2 s
    stored, now = None, 100.0
    for _ in range(5):
        stored, wait = take(rate, stored, now)
        assert wait == 0.0
    assert stored is not None and stored.tokens == pytest.approx(0.0)
    stored, wait = take(rate, stored, now)
    assert wait == pytest.approx(0.2)  # until the next token
    stored, wait = take(rate, stored, now + 0.1)
    assert wait == pytest.approx(0.1)
    _, wait = take(rate, stored, now + 0.2)
    assert wait == 0.0


def test_a_quiet_bucket_fills_up_to_its_limit_and_no_further():
    rate = Rate(limit=3, per_s=10.0)  # 0.3 a second
    stored, _ = take(rate, None, 0.0)
    stored, _ = take(rate, stored, 0.0)
    stored, _ = take(rate, stored, 0.0)
    refilled, wait = take(rate, stored, 1_000.0)
    assert wait == 0.0 and refilled.tokens == pytest.approx(2.0)  # full (3), one taken
    # A clock that went backwards (another replica's) never adds tokens.
    assert take(rate, refilled, 999.0)[0].tokens == pytest.approx(1.0)


def test_keys_name_the_task_and_a_digest_of_the_keyed_field():
    plain = Rate(limit=1)
    assert bucket_key("mail.send", plain, {"customer": "acme"}) == "mail_send"
    keyed = Rate(limit=1, key="customer.id")
    acme = bucket_key("mail.send", keyed, {"customer": {"id": "acme corp."}})
    other = bucket_key("mail.send", keyed, {"customer": {"id": "globex"}})
    assert acme.startswith("mail_send.") and acme != other
    assert acme == bucket_key("mail.send", keyed, {"customer": {"id": "acme corp."}, "x": 1})
    assert bucket_key("mail.send", keyed, {}) == bucket_key("mail.send", keyed, {"customer": 1})


def test_a_rate_is_checked():
    for wrong in (b'{"limit": 0}', b'{"limit": 1, "per_s": 0}', b'{"limit": 1, "burst": 2}'):
        with pytest.raises(msgspec.ValidationError):
            msgspec.json.decode(wrong, type=Rate)
