"""The input event: parsing and validation of the raw Kafka values, without Spark.

A purchase event is one JSON object per Kafka message (documented in
``streaming/event.schema.json`` and docs/schemas.md). Validation is a pure function on the raw
bytes so it can be unit-tested alone and run unchanged inside Spark (``mapInPandas``). An event
that fails gets a short, stable reason string; the job sends it to the dead-letter topic and
carries on, so bad input can never stop the job.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd

ID_FIELDS = ("event_id", "customer_id", "product_id")
DEFAULT_QUANTITY = 1

# Reasons (stable: consumers of the dead-letter topic may filter on them).
EMPTY_VALUE = "empty_value"
NOT_JSON = "not_json"
NOT_OBJECT = "not_object"
NON_POSITIVE_QUANTITY = "non_positive_quantity"
ABSURD_QUANTITY = "absurd_quantity"
UNPARSEABLE_TIME = "unparseable_time"
TOO_DEEP = "too_deep"
FUTURE_TIME = "future_time"
VALIDATION_ERROR = "validation_error"   # a failure the checks did not foresee (never expected)


# Every reason's kind (the part before ":"), for metrics labelled by reason with bounded cardinality.
REASON_KINDS = (EMPTY_VALUE, NOT_JSON, TOO_DEEP, NOT_OBJECT, "missing_field", "wrong_type", "invalid_text",
                "empty_id", "id_too_long", NON_POSITIVE_QUANTITY, ABSURD_QUANTITY, UNPARSEABLE_TIME, FUTURE_TIME,
                VALIDATION_ERROR)


def missing_field(name: str) -> str:
    return f"missing_field:{name}"


def wrong_type(name: str) -> str:
    return f"wrong_type:{name}"


def empty_id(name: str) -> str:
    return f"empty_id:{name}"


def id_too_long(name: str) -> str:
    return f"id_too_long:{name}"


def invalid_text(name: str) -> str:
    return f"invalid_text:{name}"


# JSON nested deeper than this is refused before parsing: Python's parser recurses per level, so
# a deep enough value would otherwise fail on the stack, at a depth that depends on the caller.
MAX_JSON_DEPTH = 64
# Text that cannot be an id, a table key or a log field: control characters (C0, DEL, C1, which
# include the ANSI terminal escapes) and lone surrogates (a "\ud800" escape decodes to one, and
# it has no UTF-8 encoding: Arrow, Kafka and DynamoDB all refuse it).
_BAD_TEXT = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


@dataclass(frozen=True)
class ValidationRules:
    """The limits an event must respect (from the ``streaming`` config section)."""

    max_quantity: int = 1000
    max_id_length: int = 64
    max_future_skew_ms: int = 86_400_000

    @classmethod
    def from_config(cls, cfg) -> ValidationRules:
        from streaming.settings import duration_ms

        return cls(max_quantity=int(cfg.get_path("streaming.max_quantity")),
                   max_id_length=int(cfg.get_path("streaming.max_id_length")),
                   max_future_skew_ms=duration_ms(cfg.get_path("streaming.max_future_skew")))


# The columns validate_values returns, in order (mirrored by streaming.job.VALIDATED_SCHEMA).
VALIDATED_COLUMNS = ("event_id", "customer_id", "product_id", "quantity", "event_time_ms", "segment", "reason")

# An ISO-8601 date, optionally followed by a time: the forms fromisoformat accepts that are not
# ISO-8601 (e.g. "20240101", week dates) are refused by this first.
_ISO_PREFIX = re.compile(r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?)?(Z|[+-]\d{2}:?\d{2})?$", re.ASCII)


def parse_event_time_ms(text: str) -> int | None:
    """Epoch milliseconds of an ISO-8601 time; a time without an offset is taken as UTC."""
    if not _ISO_PREFIX.match(text):
        return None
    # fromisoformat takes at most microseconds: trim nanosecond precision.
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(math.floor(parsed.timestamp() * 1000))


def validate_value(value: bytes | None, rules: ValidationRules, reference_ms: int) -> tuple:
    """One raw Kafka value -> (event_id, customer_id, product_id, quantity, event_time_ms, segment, reason).

    ``reason`` is None for a valid event; otherwise the other fields are None. The first problem
    found is reported, in a fixed order, so the same bytes always get the same reason.
    ``reference_ms`` is the clock an event time may not run ahead of by more than the allowed
    skew: the job passes the message's Kafka timestamp, not the wall clock, so a replay and the
    two queries reading the same message always agree on it.
    """
    if value is None or len(value) == 0:
        return _invalid(EMPTY_VALUE)
    try:
        text = bytes(value).decode("utf-8")     # strict UTF-8: no UTF-16/32, no byte order mark
    except UnicodeDecodeError:
        return _invalid(NOT_JSON)
    if _nested_deeper_than(text, MAX_JSON_DEPTH):
        return _invalid(TOO_DEEP)
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        return _invalid(NOT_JSON)
    if not isinstance(document, dict):
        return _invalid(NOT_OBJECT)
    ids = []
    for name in ID_FIELDS:
        reason = _id_problem(document, name, rules.max_id_length)
        if reason:
            return _invalid(reason)
        ids.append(document[name])
    quantity = document.get("quantity", DEFAULT_QUANTITY)
    reason = _quantity_problem(quantity, rules.max_quantity)
    if reason:
        return _invalid(reason)
    if document.get("event_time") is None:
        return _invalid(missing_field("event_time"))
    if not isinstance(document["event_time"], str):
        return _invalid(wrong_type("event_time"))
    event_time_ms = parse_event_time_ms(document["event_time"])
    if event_time_ms is None:
        return _invalid(UNPARSEABLE_TIME)
    if event_time_ms > reference_ms + rules.max_future_skew_ms:
        return _invalid(FUTURE_TIME)
    segment = document.get("segment")
    if segment is not None:     # optional: a country or a store, for new customers' popularity list
        if not isinstance(segment, str):
            return _invalid(wrong_type("segment"))
        if _BAD_TEXT.search(segment):
            return _invalid(invalid_text("segment"))
        if len(segment) > rules.max_id_length:
            return _invalid(id_too_long("segment"))
        segment = segment.strip() or None
    return (*ids, int(quantity), event_time_ms, segment, None)


def _invalid(reason: str) -> tuple:
    return (None, None, None, None, None, None, reason)


def _id_problem(document: dict, name: str, max_length: int) -> str | None:
    if name not in document or document[name] is None:
        return missing_field(name)
    value = document[name]
    if not isinstance(value, str):
        return wrong_type(name)
    if _BAD_TEXT.search(value):
        return invalid_text(name)
    if not value.strip():
        return empty_id(name)
    if len(value) > max_length:
        return id_too_long(name)
    return None


def _nested_deeper_than(text: str, limit: int) -> bool:
    """Whether JSON ``text`` nests arrays/objects more than ``limit`` deep (brackets inside
    strings do not count). Hand-written: the json module has no depth limit to ask for."""
    if text.count("[") + text.count("{") <= limit:      # the common case: cannot be that deep
        return False
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _quantity_problem(quantity: Any, max_quantity: int) -> str | None:
    # bool is an int in Python but not a quantity; 2.0 is accepted as 2, 2.5 is not.
    if isinstance(quantity, bool) or not isinstance(quantity, (int, float)):
        return wrong_type("quantity")
    if isinstance(quantity, float) and not (math.isfinite(quantity) and quantity.is_integer()):
        return wrong_type("quantity")
    if quantity <= 0:
        return NON_POSITIVE_QUANTITY
    if quantity > max_quantity:
        return ABSURD_QUANTITY
    return None


def _validate_safely(value: bytes | None, rules: ValidationRules, reference_ms: int) -> tuple:
    """``validate_value``, with any failure it did not foresee turned into a reason: one odd
    message must never fail the micro-batch (and with it the job)."""
    try:
        row = validate_value(value, rules, reference_ms)
        for field in row:       # the last line of defence: text Arrow cannot encode fails the batch
            if isinstance(field, str):
                field.encode("utf-8")
        return row
    except Exception as err:  # noqa: BLE001 - reported as the event's reason instead
        return _invalid(f"{VALIDATION_ERROR}:{type(err).__name__}")


def validate_values(values: Sequence[bytes | None], rules: ValidationRules,
                    reference_ms: int | Sequence[int]) -> pd.DataFrame:
    """Validate a batch of raw values: one row per value, columns ``VALIDATED_COLUMNS``.

    ``reference_ms`` is one clock for all values or one per value (their Kafka timestamps).
    """
    references = [reference_ms] * len(values) if isinstance(reference_ms, (int, float)) else reference_ms
    rows = [_validate_safely(value, rules, int(reference)) for value, reference in zip(values, references)]
    frame = pd.DataFrame.from_records(rows, columns=list(VALIDATED_COLUMNS))
    return frame.astype({"event_id": object, "customer_id": object, "product_id": object,
                         "quantity": "Int64", "event_time_ms": "Int64", "segment": object, "reason": object})
