"""Reading a whole KV bucket (listings, sweeps, registrations) on a real nats-server."""

from __future__ import annotations

import asyncio

from kapellmeister.store import read_bucket


async def read(kv) -> list[tuple[str, bytes]]:
    return [item async for item in read_bucket(kv, quiet_s=2.0)]


async def test_an_empty_bucket_reads_as_nothing_at_once(js):
    kv = await js.create_key_value(bucket="empty")
    assert await asyncio.wait_for(read(kv), timeout=1.0) == []


async def test_every_key_is_read_once_at_its_latest_value_and_deleted_keys_are_not(js):
    kv = await js.create_key_value(bucket="some", history=5)
    for n in range(50):
        await kv.put(f"k{n:02d}", b"old")
    for n in range(0, 50, 2):
        await kv.put(f"k{n:02d}", b"new")
    await kv.delete("k01")
    await kv.purge("k03")
    await kv.delete("k49")  # the last message of the bucket is a delete marker
    got = await asyncio.wait_for(read(kv), timeout=1.0)
    expected = [
        (f"k{n:02d}", b"new" if n % 2 == 0 else b"old") for n in range(50) if n not in (1, 3, 49)
    ]
    assert sorted(got) == expected


async def test_a_bucket_of_only_deleted_keys_reads_as_nothing_without_waiting(js):
    kv = await js.create_key_value(bucket="gone")
    await kv.put("a", b"1")
    await kv.delete("a")
    assert await asyncio.wait_for(read(kv), timeout=1.0) == []


async def test_a_big_bucket_is_read_in_batches_and_leaves_no_consumer(js):
    kv = await js.create_key_value(bucket="big")
    for n in range(700):
        await kv.put(f"k{n:03d}", b"v%d" % n)
    got = [item async for item in read_bucket(kv, quiet_s=2.0, batch=64)]
    assert len(got) == 700 and got[699] == ("k699", b"v699")  # in stream order
    assert await js.consumers_info("KV_big") == []


async def test_a_key_purged_under_the_read_ends_nothing_early(js):
    """A purge of a key not read yet leaves a gap the server waits out at a batch's
    start; the read goes on past it (it once ended there and lost every key after)."""
    kv = await js.create_key_value(bucket="gap")
    for n in range(20):
        await kv.put(f"k{n:02d}", b"v")
    reading = read_bucket(kv, quiet_s=5.0, batch=5)
    got = [await anext(reading), await anext(reading)]
    await kv.purge("k15")
    got += [item async for item in reading]
    assert [key for key, _ in got] == [f"k{n:02d}" for n in range(20) if n != 15]


async def test_a_key_written_during_the_read_comes_once(js):
    kv = await js.create_key_value(bucket="busy")
    for n in range(10):
        await kv.put(f"k{n}", b"old")
    reading = read_bucket(kv, quiet_s=5.0, batch=3)
    first = await anext(reading)
    await kv.put(first[0], b"new")
    rest = [item async for item in reading]
    keys = [first[0]] + [key for key, _ in rest]
    assert sorted(keys) == [f"k{n}" for n in range(10)]  # each once
