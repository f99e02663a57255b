"""Reading a whole topic in tests: up to its end offsets, never "until it goes quiet".

A reader that stops after a few silent seconds passes for a short topic on a loaded machine
(a slow fetch looks like the end); the end offsets say where the topic ends.
"""
from __future__ import annotations

import time


def read_topic(cfg, topic: str, expect_at_least: int = 0, timeout_s: float = 60) -> list:
    """Every message of ``topic`` from the beginning to its end offsets (taken again while fewer
    than ``expect_at_least`` have been read); a TimeoutError says how far it got."""
    from kafka import KafkaConsumer, TopicPartition

    from models.clients import kafka_options

    consumer = KafkaConsumer(**kafka_options(cfg), enable_auto_commit=False, group_id=None)
    deadline = time.monotonic() + timeout_s
    try:
        partitions = None
        while not partitions:
            partitions = consumer.partitions_for_topic(topic)
            if not partitions and time.monotonic() > deadline:
                raise TimeoutError(f"topic {topic} has no partitions after {timeout_s} s")
            time.sleep(0 if partitions else 0.2)
        assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        consumer.seek_to_beginning(*assigned)
        messages: list = []
        while True:
            end = consumer.end_offsets(assigned)
            while any(consumer.position(tp) < end[tp] for tp in assigned):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"topic {topic}: read {len(messages)} messages of "
                                       f"{sum(end.values())} in {timeout_s} s")
                for batch in consumer.poll(timeout_ms=500).values():
                    messages.extend(batch)
            if len(messages) >= expect_at_least:
                return sorted(messages, key=lambda m: (m.partition, m.offset))
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {topic}: {len(messages)} messages, expected at least "
                                   f"{expect_at_least} within {timeout_s} s")
            time.sleep(0.5)
    finally:
        consumer.close()


def newest_records(cfg, topic: str, timeout_s: float = 60) -> dict[str, dict]:
    """The newest recommendation record per customer on ``topic`` (read to its end offsets), as a
    consumer keeps it: the largest (``last_event_ms``, ``computed_at_ms``)."""
    import json

    newest: dict[str, dict] = {}
    for message in read_topic(cfg, topic, timeout_s=timeout_s):
        record = json.loads(message.value)
        previous = newest.get(record["customer_id"])
        if previous is None or (record["last_event_ms"] or 0, record["computed_at_ms"]) >= \
                (previous["last_event_ms"] or 0, previous["computed_at_ms"]):
            newest[record["customer_id"]] = record
    return newest
