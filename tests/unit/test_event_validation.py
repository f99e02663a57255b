"""Validation of raw transaction values: every kind of bad input gets its stable reason."""
from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from models.config import ConfigError, load_config
from streaming.events import ValidationRules, parse_event_time_ms, validate_value, validate_values
from streaming.settings import StreamingSettings, duration_ms

RULES = ValidationRules(max_quantity=1000, max_id_length=64, max_future_skew_ms=86_400_000)
NOW_MS = int(datetime(2024, 6, 1, tzinfo=UTC).timestamp() * 1000)
GOOD = {"event_id": "e1", "customer_id": "C1", "product_id": "P1", "quantity": 3,
        "event_time": "2024-03-01T12:34:56.789Z"}


def _check(document, **overrides) -> tuple:
    if isinstance(document, dict):
        document = {**document, **overrides}
        raw = json.dumps(document).encode()
    else:
        raw = document
    return validate_value(raw, RULES, NOW_MS)


def test_a_good_event_is_parsed():
    assert _check(GOOD) == ("e1", "C1", "P1", 3, 1709296496789, None, None)


def test_the_optional_segment_is_kept_and_checked():
    assert _check(GOOD, segment="FR")[5:] == ("FR", None)
    assert _check(GOOD, segment="  ")[5:] == (None, None)       # blank: no segment
    assert _check(GOOD, segment=None)[5:] == (None, None)
    assert _check(GOOD, segment=44)[-1] == "wrong_type:segment"
    assert _check(GOOD, segment="S" * 65)[-1] == "id_too_long:segment"


def test_quantity_defaults_to_one_and_integral_floats_are_accepted():
    without = {k: v for k, v in GOOD.items() if k != "quantity"}
    assert _check(without)[3] == 1
    assert _check(GOOD, quantity=2.0)[3] == 2


@pytest.mark.parametrize("raw, reason", [
    (b"", "empty_value"),
    (None, "empty_value"),
    (b"{not json", "not_json"),
    (b"\xff\xfe\x00garbage", "not_json"),
    (b'"just a string"', "not_object"),
    (b"[1, 2]", "not_object"),
])
def test_values_that_are_not_event_objects(raw, reason):
    assert validate_value(raw, RULES, NOW_MS)[-1] == reason


@pytest.mark.parametrize("field", ["event_id", "customer_id", "product_id", "event_time"])
def test_missing_fields(field):
    document = {k: v for k, v in GOOD.items() if k != field}
    assert _check(document)[-1] == f"missing_field:{field}"


@pytest.mark.parametrize("overrides, reason", [
    ({"customer_id": 17850}, "wrong_type:customer_id"),
    ({"customer_id": None}, "missing_field:customer_id"),
    ({"product_id": ["P1"]}, "wrong_type:product_id"),
    ({"event_id": "   "}, "empty_id:event_id"),
    ({"product_id": "P" * 65}, "id_too_long:product_id"),
    ({"quantity": "3"}, "wrong_type:quantity"),
    ({"quantity": True}, "wrong_type:quantity"),
    ({"quantity": 2.5}, "wrong_type:quantity"),
    ({"quantity": None}, "wrong_type:quantity"),
    ({"quantity": 0}, "non_positive_quantity"),
    ({"quantity": -4}, "non_positive_quantity"),
    ({"quantity": 1001}, "absurd_quantity"),
    ({"quantity": 1e300}, "absurd_quantity"),
    ({"event_time": 1709296496}, "wrong_type:event_time"),
    ({"event_time": "yesterday"}, "unparseable_time"),
    ({"event_time": "2024-13-01T00:00:00Z"}, "unparseable_time"),
    ({"event_time": "20240301"}, "unparseable_time"),
    ({"event_time": "2030-01-01T00:00:00Z"}, "future_time"),
])
def test_wrong_values_get_their_reason(overrides, reason):
    result = _check(GOOD, **overrides)
    assert result[-1] == reason
    assert result[:-1] == (None,) * 6


def test_id_at_the_length_limit_is_accepted():
    assert _check(GOOD, product_id="P" * 64)[-1] is None


@pytest.mark.parametrize("text, expected", [
    ("2024-03-01T12:34:56Z", "2024-03-01T12:34:56+00:00"),
    ("2024-03-01T12:34:56", "2024-03-01T12:34:56+00:00"),      # no offset: UTC
    ("2024-03-01T14:34:56+02:00", "2024-03-01T12:34:56+00:00"),
    ("2024-03-01 12:34:56.123456789Z", "2024-03-01T12:34:56.123456+00:00"),
    ("2024-03-01", "2024-03-01T00:00:00+00:00"),
])
def test_iso_times_in_their_common_forms(text, expected):
    assert parse_event_time_ms(text) == int(datetime.fromisoformat(expected).timestamp() * 1000)


def test_batch_validation_keeps_row_order_and_types():
    values = [json.dumps(GOOD).encode(), b"nope", None, json.dumps({**GOOD, "event_id": "e2"}).encode()]
    frame = validate_values(values, RULES, NOW_MS)
    assert list(frame["event_id"]) == ["e1", None, None, "e2"]
    assert list(frame["reason"]) == [None, "not_json", "empty_value", None]
    assert frame["quantity"].dtype.name == "Int64"
    assert frame.loc[3, "event_time_ms"] == 1709296496789


def test_limits_come_from_the_config():
    cfg = load_config(files=[], env={"RECO__STREAMING__MAX_QUANTITY": "5",
                                     "RECO__STREAMING__MAX_ID_LENGTH": "3"})
    rules = ValidationRules.from_config(cfg)
    assert validate_value(json.dumps({**GOOD, "quantity": 6}).encode(), rules, NOW_MS)[-1] == "absurd_quantity"
    assert validate_value(json.dumps({**GOOD, "event_id": "e123"}).encode(), rules, NOW_MS)[-1] \
        == "id_too_long:event_id"


def test_the_json_schema_file_states_the_same_limits_as_the_defaults():
    schema = json.loads((Path(__file__).resolve().parents[2] / "streaming" / "event.schema.json").read_text())
    defaults = ValidationRules.from_config(load_config(files=[], env={}))
    assert schema["properties"]["quantity"]["maximum"] == defaults.max_quantity
    assert all(schema["properties"][f]["maxLength"] == defaults.max_id_length
               for f in ("event_id", "customer_id", "product_id"))
    assert set(schema["required"]) == {"event_id", "customer_id", "product_id", "event_time"}


@pytest.mark.parametrize("text, expected", [
    ("2 seconds", 2000), ("500ms", 500), ("90 days", 90 * 86_400_000), ("1h", 3_600_000),
    ("10 minutes", 600_000), (3, 3000), ("1.5 s", 1500),
])
def test_durations(text, expected):
    assert duration_ms(text) == expected


@pytest.mark.parametrize("text", ["soon", "3 fortnights", True, "-1 s"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ConfigError, match="not a duration"):
        duration_ms(text, "streaming.state_ttl")


def test_streaming_settings_resolve_the_checkpoint_under_the_run_dir(tmp_path):
    cfg = load_config(files=[], env={"RECO__RUN_DIR": str(tmp_path)})
    settings = StreamingSettings.from_config(cfg)
    assert settings.checkpoint_dir == str(tmp_path / "checkpoints" / "streaming")
    assert settings.k == 10 and settings.exclude_purchased is True
    with pytest.raises(ConfigError, match="starting_offsets"):
        StreamingSettings.from_config(cfg.with_overrides({"streaming.starting_offsets": "oldest"}))


def test_the_dead_letter_query_has_its_own_longer_trigger():
    cfg = load_config(files=[], env={"RECO__STREAMING__DEAD_LETTER_TRIGGER_INTERVAL": "30 seconds"})
    settings = StreamingSettings.from_config(cfg)
    assert (settings.trigger_interval_ms, settings.dead_letter_trigger_interval_ms) == (500, 30_000)
    assert StreamingSettings.from_config(load_config(files=[])).dead_letter_trigger_interval_ms == 10_000
    with pytest.raises(ConfigError, match="dead_letter_trigger_interval"):
        StreamingSettings.from_config(cfg.with_overrides({"streaming.dead_letter_trigger_interval": "soon"}))


def test_state_partitions_default_to_two_and_must_be_positive():
    cfg = load_config(files=[])
    assert StreamingSettings.from_config(cfg).state_partitions == 2
    assert StreamingSettings.from_config(cfg.with_overrides({"streaming.state_partitions": 8})).state_partitions == 8
    with pytest.raises(ConfigError, match="state_partitions"):
        StreamingSettings.from_config(cfg.with_overrides({"streaming.state_partitions": 0}))


def test_an_unforeseen_failure_becomes_a_reason_not_an_error():
    class Unreadable(bytes):
        def __len__(self):
            raise RuntimeError("broken buffer")

    frame = validate_values([Unreadable(b"x"), json.dumps(GOOD).encode()], RULES, NOW_MS)
    assert list(frame["reason"]) == ["validation_error:RuntimeError", None]


# -- hostile input (issue: a lone surrogate crash-looped the job) --------------------------------
POISON = b'{"event_id":"s1","customer_id":"C\\ud800x","product_id":"P1","event_time":"2024-03-01T01:58:15Z"}'


def test_a_lone_surrogate_escape_in_an_id_is_refused_not_passed_on():
    assert validate_value(POISON, RULES, NOW_MS) == (None,) * 6 + ("invalid_text:customer_id",)


@pytest.mark.parametrize("field", ["event_id", "customer_id", "product_id", "segment"])
@pytest.mark.parametrize("text", ["C\x1b[31mred", "C\x00", "tab\there", "C\x7f", "C\x85", "\udfff"])
def test_control_characters_and_surrogates_in_text_fields_are_refused(field, text):
    assert _check(GOOD, **{field: text})[-1] == f"invalid_text:{field}"


def test_printable_unicode_ids_are_kept():
    assert _check(GOOD, customer_id="Zoë-東京-🛒")[1] == "Zoë-東京-🛒"


@pytest.mark.parametrize("raw", [
    json.dumps(GOOD).encode("utf-16"),                 # UTF-16 with its byte order mark
    json.dumps(GOOD).encode("utf-16-le"),
    json.dumps(GOOD).encode("utf-32"),
    b"\xef\xbb\xbf" + json.dumps(GOOD).encode(),      # a UTF-8 byte order mark
    json.dumps(GOOD).encode()[:-1] + b"\xed\xa0\x80}",  # a surrogate encoded as UTF-8 bytes (CESU)
])
def test_values_that_are_not_plain_utf8_json_are_not_json(raw):
    assert validate_value(raw, RULES, NOW_MS)[-1] == "not_json"


def test_a_null_event_time_is_a_missing_field_as_documented():
    assert _check(GOOD, event_time=None)[-1] == "missing_field:event_time"


def test_deep_nesting_is_refused_with_its_own_reason_at_any_depth():
    from streaming.events import MAX_JSON_DEPTH

    def nested(depth: int) -> bytes:      # GOOD with an extra field nested `depth` arrays deep
        return json.dumps(GOOD)[:-1].encode() + b', "extra": ' + b"[" * depth + b"]" * depth + b"}"

    assert validate_value(nested(MAX_JSON_DEPTH - 1), RULES, NOW_MS)[-1] is None   # + the event's object
    assert validate_value(nested(MAX_JSON_DEPTH), RULES, NOW_MS)[-1] == "too_deep"
    assert validate_value(nested(5000), RULES, NOW_MS)[-1] == "too_deep"
    assert _check(GOOD, extra="[" * 5000)[-1] is None                # brackets inside a string: text


def test_the_validator_output_always_converts_to_arrow():
    """The crash itself: Spark's mapInPandas converts the validator's output with Arrow, which
    refuses text without a UTF-8 encoding. Every row of a hostile batch must convert."""
    import pandas as pd
    import pyarrow as pa

    from streaming.job import VALIDATED_COLUMNS, _validator

    values = [POISON, json.dumps(GOOD).encode(), b"\xff", json.dumps({**GOOD, "segment": "\ud83d"}).encode()]
    raw = pd.DataFrame({"key": [b"k"] * 4, "value": values, "topic": ["t"] * 4, "partition": [0] * 4,
                        "offset": range(4), "timestamp": [pd.Timestamp(NOW_MS, unit="ms")] * 4})
    out = next(_validator(RULES)(iter([raw])))
    table = pa.Table.from_pandas(out[VALIDATED_COLUMNS], preserve_index=False)
    assert table.column("reason").to_pylist() == ["invalid_text:customer_id", None, "not_json",
                                                  "invalid_text:segment"]
