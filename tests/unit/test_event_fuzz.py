"""Property-based tests of the raw-bytes validator: whatever a producer sends, the validator
returns an event that meets the documented limits, or a documented reason, and never raises.

The reasons are read from docs/schemas.md, so a reason the code invents without documenting it
fails here. Each batch is also converted with Arrow, as Spark's ``mapInPandas`` does: text
Arrow cannot encode once crash-looped the job (a lone surrogate from a ``\\ud800`` escape).
"""
from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streaming.events import ValidationRules, validate_values

RULES = ValidationRules(max_quantity=1000, max_id_length=64, max_future_skew_ms=86_400_000)
NOW_MS = int(datetime(2024, 6, 1, tzinfo=UTC).timestamp() * 1000)
GOOD = {"event_id": "e1", "customer_id": "C1", "product_id": "P1", "quantity": 3,
        "event_time": "2024-03-01T12:34:56.789Z", "segment": "FR"}
SCHEMAS_DOC = Path(__file__).resolve().parents[2] / "docs" / "schemas.md"
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def documented_reasons() -> re.Pattern:
    """The dead-letter reasons of docs/schemas.md's table, as one regex (`<field>` is a field name)."""
    section = SCHEMAS_DOC.read_text().split("## Dead-letter message", 1)[1].split("\n## ", 1)[0]
    reasons = re.findall(r"^\| `([a-z_]+(?::<[a-z]+>)?)` \|", section, flags=re.M)
    assert len(reasons) >= 10, f"the reason table of {SCHEMAS_DOC} was not found"
    return re.compile("|".join(re.escape(r).replace(re.escape("<field>"), r"[a-z_]+")
                               .replace(re.escape("<exception>"), r"[A-Za-z_]+") for r in reasons))


REASONS = documented_reasons()


def check_batch(values: list[bytes | None]) -> None:
    frame = validate_values(values, RULES, NOW_MS)
    assert len(frame) == len(values)
    pa.Table.from_pandas(frame, preserve_index=False)       # what mapInPandas does with it
    for row in frame.itertuples(index=False):
        if row.reason is None:
            check_valid(row)
        else:
            assert REASONS.fullmatch(row.reason), f"undocumented reason {row.reason!r}"
            assert (row.event_id, row.customer_id, row.product_id, row.segment) == (None,) * 4


def check_valid(row) -> None:
    for text in (row.event_id, row.customer_id, row.product_id):
        assert isinstance(text, str) and 1 <= len(text) <= RULES.max_id_length and text.strip()
        text.encode("utf-8")                                  # strict: raises on a lone surrogate
        assert not CONTROL.search(text)
    if row.segment is not None:
        assert len(row.segment) <= RULES.max_id_length and not CONTROL.search(row.segment)
        row.segment.encode("utf-8")
    assert 1 <= int(row.quantity) <= RULES.max_quantity
    assert int(row.event_time_ms) <= NOW_MS + RULES.max_future_skew_ms


# Any code point, surrogates included: json.dumps writes those as \\udXXX escapes.
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=80)
JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT
ANY_JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(ANY_TEXT, inner, max_size=4), max_leaves=20)


@FUZZ
@given(st.lists(st.none() | st.binary(max_size=300), min_size=1, max_size=8))
def test_arbitrary_bytes(values):
    check_batch(values)


@FUZZ
@given(st.lists(ANY_JSON, min_size=1, max_size=8))
def test_arbitrary_json(documents):
    check_batch([json.dumps(d).encode() for d in documents])


def mutated_event(draw) -> dict:
    event = dict(GOOD)
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from(sorted(GOOD) + ["extra"]))
        action = draw(st.sampled_from(["drop", "json", "text", "time"]))
        if action == "drop":
            event.pop(field, None)
        elif action == "json":
            event[field] = draw(ANY_JSON)
        elif action == "text":
            event[field] = draw(ANY_TEXT)
        else:
            event[field] = draw(st.datetimes(timezones=st.just(UTC))).isoformat()
    return event


@FUZZ
@given(st.data())
def test_mutated_events(data):
    events = [data.draw(st.composite(lambda draw: mutated_event(draw))()) for _ in range(4)]
    check_batch([json.dumps(e, ensure_ascii=data.draw(st.booleans())).encode("utf-8", "surrogatepass")
                 for e in events])


@FUZZ
@given(st.data())
def test_byte_level_corruption_of_a_valid_event(data):
    raw = bytearray(json.dumps(GOOD).encode())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw)))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip" and at < len(raw):
            raw[at] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del raw[at:at + data.draw(st.integers(1, 8))]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    check_batch([bytes(raw)])


def test_the_fuzz_oracle_accepts_a_good_event_and_knows_every_reason():
    """A negative control for the oracle above: a good event passes its checks, and the reason
    regex refuses a made-up reason."""
    check_batch([json.dumps(GOOD).encode()])
    assert validate_values([json.dumps(GOOD).encode()], RULES, NOW_MS)["reason"].isna().all()
    assert not REASONS.fullmatch("made_up_reason")
    assert REASONS.fullmatch("invalid_text:customer_id") and REASONS.fullmatch("too_deep")
