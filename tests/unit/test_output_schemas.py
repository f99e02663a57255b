"""The output contract without services: the JSON Schemas of the recommendation record and the
table item are valid, agree with each other, with docs/schemas.md's tables and with the records
the code builds (stream, batch, re-filled), and refuse what the contract rules out.
"""
from __future__ import annotations

import json
import re
from decimal import Decimal

import numpy as np
import pandas as pd
import pytest

from models import scorers
from models.config import REPO_ROOT
from models.records import SCHEMA_VERSION, RecommendationRecord, build_records
from tests.contract import (
    ITEM_SCHEMA,
    RECORD_SCHEMA,
    errors,
    every_strategy_scoring,
    item_validator,
    load_schema,
    plain,
    record_validator,
    without_nulls,
)
from tests.small_models import PAST_CUTOFF

DOCS = REPO_ROOT / "docs" / "schemas.md"
NULLABLE = {"last_event_time", "last_event_ms", "source_offsets"}


def _table(section: str) -> dict[str, list[str]]:
    """{field: [the row's other cells]} of the first table under ``### <section>`` in docs/schemas.md."""
    lines = DOCS.read_text().split(f"### {section}\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    rows = {}
    for line in lines[start + 2:end]:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        (name,) = re.findall(r"`(\w+)`", cells[0])
        rows[name] = cells[1:]
    return rows


def _types(spec: dict) -> set[str]:
    kinds = spec["type"]
    return {kinds} if isinstance(kinds, str) else set(kinds)


# -- the schema files ---------------------------------------------------------------------------
@pytest.mark.parametrize("path", [RECORD_SCHEMA, ITEM_SCHEMA], ids=["record", "item"])
def test_the_schema_files_are_valid_2020_12_schemas_and_their_examples_pass(path):
    from jsonschema import Draft202012Validator

    schema = load_schema(path)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    validator = record_validator() if path == RECORD_SCHEMA else item_validator()
    assert schema["examples"] and all(errors(validator, example) == [] for example in schema["examples"])
    assert schema["additionalProperties"] is True             # consumers must ignore unknown fields
    assert schema["properties"]["schema_version"]["const"] == SCHEMA_VERSION


def test_the_item_has_the_messages_fields_and_types_with_null_as_absent():
    record, item = load_schema(RECORD_SCHEMA), load_schema(ITEM_SCHEMA)
    assert set(item["properties"]) == set(record["properties"])
    nullable = {name for name, spec in record["properties"].items() if "null" in _types(spec)}
    assert nullable == NULLABLE
    assert set(item["required"]) == set(record["required"]) - nullable
    assert set(record["required"]) == set(record["properties"]) - {"purchases_since_cutoff", "buy_again"}
    for name, spec in record["properties"].items():
        other = item["properties"][name]
        assert _types(other) == _types(spec) - {"null"}, name
        same = {k: v for k, v in spec.items() if k not in ("type", "description")}
        assert {k: v for k, v in other.items() if k not in ("type", "description")} == same, name
    assert item["$defs"] == record["$defs"]


def test_the_strategies_are_those_the_scorers_produce():
    for path in (RECORD_SCHEMA, ITEM_SCHEMA):
        assert load_schema(path)["properties"]["strategy"]["enum"] == \
            [scorers.PERSONALIZED, scorers.POPULARITY, scorers.SEGMENT_POPULARITY]


# -- the docs' tables ---------------------------------------------------------------------------
JSON_WORDS = {"integer": "integer", "string": "string", "array": "array", "object": "object", "null": "null"}
DYNAMO_WORDS = {"String": {"string"}, "Number": {"integer", "number"}, "List of Maps": {"array"}, "Map": {"object"}}


def test_the_documented_message_table_lists_the_schemas_fields_types_and_presence():
    schema = load_schema(RECORD_SCHEMA)
    documented = _table("Topic message")
    assert set(documented) == set(schema["properties"])
    for name, (kind, present, _content) in documented.items():
        assert {JSON_WORDS[word] for word in kind.split(" or ")} == _types(schema["properties"][name]), name
        assert present == ("always" if name in schema["required"] else "optional"), name
    assert documented["schema_version"][2].startswith(f"{SCHEMA_VERSION},")
    for strategy in schema["properties"]["strategy"]["enum"]:
        assert f"`{strategy}`" in documented["strategy"][2]


def test_the_documented_item_table_lists_the_schemas_attributes_types_and_presence():
    schema = load_schema(ITEM_SCHEMA)
    documented = _table("Table item")
    assert set(documented) == set(schema["properties"])
    for name, (kind, present) in documented.items():
        assert _types(schema["properties"][name]) <= DYNAMO_WORDS[kind], name
        expected = "always" if name in schema["required"] else "when known" if name in NULLABLE else "optional"
        assert present == expected, name


def test_the_readme_names_every_field_and_strategy():
    section = (REPO_ROOT / "README.md").read_text().split("## Data formats", 1)[1].split("\n## ", 1)[0]
    output = section.split("**Output record**", 1)[1].split("\n* **", 1)[0]
    schema = load_schema(RECORD_SCHEMA)
    for name in [*schema["properties"], *schema["properties"]["strategy"]["enum"]]:
        assert f"`{name}`" in output, name


def test_the_consumer_example_keeps_the_newest_by_the_documented_rule():
    block = DOCS.read_text().split("### Keeping the latest list per customer", 1)[1].split("```python\n", 1)[1]
    code = block.split("```", 1)[0].split("\nfrom kafka import", 1)[0]
    namespace: dict = {}
    exec(compile(code, "docs/schemas.md", "exec"), namespace)
    latest: dict = {}
    old = _record("C1", last_event_ms=None, computed_at_ms=9)
    new = _record("C1", last_event_ms=5, computed_at_ms=1)
    for record in (new, old, _record("C1", last_event_ms=5, computed_at_ms=0)):     # newest first
        namespace["keep_latest"](latest, record.to_json_bytes())
    assert latest == {"C1": new.to_message()}
    with pytest.raises(ValueError, match="schema_version"):
        namespace["keep_latest"](latest, json.dumps({**new.to_message(), "schema_version": 99}).encode())


# -- records the code builds ----------------------------------------------------------------------
def _record(customer: str, last_event_ms: int | None, computed_at_ms: int, **kwargs) -> RecommendationRecord:
    return RecommendationRecord(customer_id=customer, product_ids=["P1", "P2"], scores=[0.5, 0.25],
                                model_version="v1", strategy="personalized", last_event_ms=last_event_ms,
                                computed_at_ms=computed_at_ms, source="batch", **kwargs)


def _stream_records() -> list[RecommendationRecord]:
    from streaming.refresh import records_for
    from streaming.state import iso_to_ms

    after = iso_to_ms(PAST_CUTOFF) + 1_000
    return records_for(*every_strategy_scoring(after), computed_at_ms=after + 99)


def _batch_records() -> list[RecommendationRecord]:
    records = build_records(["C7", "C8"], np.array([[2, 0, -1], [1, -1, -1]]),
                            np.array([[0.9, 0.5, np.nan], [0.7, np.nan, np.nan]], dtype=np.float32),
                            np.array(["A", "B", "C"]), "v42", ["personalized", "popularity"],
                            [1_700_000_000_000, None], source="batch")
    for record in records:
        record.extra["buy_again"] = [{"rank": 1, "product_id": "B", "score": 1.5}]
    return records


def _refilled_batch_records() -> list[RecommendationRecord]:
    from tools.refill import batch_records

    frame = pd.DataFrame({"customer_id": ["C1", "C2"], "recommendations": [["A", "B"], ["C"]],
                          "scores": [[0.5, 0.25], [1.0]]})
    return batch_records(frame, "v42", "personalized", computed_at_ms=1_700_000_000_000)


def test_stream_records_cover_every_strategy_and_meet_both_schemas():
    records = _stream_records()
    assert [r.strategy for r in records] == ["personalized", "segment_popularity", "popularity", "personalized"]
    _check(records)


def test_batch_and_refilled_records_meet_both_schemas():
    _check(_batch_records() + _refilled_batch_records())


def _check(records: list[RecommendationRecord]) -> None:
    messages, items = record_validator(), item_validator()
    for record in records:
        message = json.loads(record.to_json_bytes())
        assert errors(messages, message) == [], record.customer_id
        item = record.to_item()
        assert errors(items, item) == [], record.customer_id
        assert errors(items, plain(item)) == [], record.customer_id
        assert plain(item) == without_nulls(message), record.customer_id    # the same fields, types, values
        assert not any(isinstance(v, float) for v in _leaves(item)), "DynamoDB takes no float"


def _leaves(value):
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


# -- what the contract refuses --------------------------------------------------------------------
@pytest.mark.parametrize("change, where", [
    ({"strategy": "random"}, "strategy"),
    ({"last_event_ms": 1.5}, "last_event_ms"),
    ({"source_offsets": '{"transactions-0": 7}'}, "source_offsets"),      # version 1's table form
    ({"schema_version": 1}, "schema_version"),
    ({"recommendations": [{"rank": 0, "product_id": "P1", "score": 1.0}]}, "recommendations/0/rank"),
    ({"computed_at": "2025-03-04 10:21:09"}, "computed_at"),
    ({"purchases_since_cutoff": None}, "<root>"),                          # stream records carry it
    ({"undocumented": 1}, "<root>"),                                        # strict: every field documented
])
def test_the_record_schema_refuses_what_the_contract_rules_out(change, where):
    message = {**_stream_records()[0].to_message(), **change}
    if change.get("purchases_since_cutoff", 0) is None:
        del message["purchases_since_cutoff"]
    found = errors(record_validator(), message)
    assert found and any(line.startswith(f"{where}:") for line in found), found


def test_the_item_schema_refuses_nulls_version_1_forms_and_floats_for_integers():
    item = _stream_records()[0].to_item()
    validator = item_validator()
    assert errors(validator, item) == []
    for change in ({"last_event_ms": None}, {"source_offsets": json.dumps(item["source_offsets"])},
                   {"computed_at_ms": Decimal("1.5")}, {"last_event_ms": 0, "schema_version": 1}):
        assert errors(validator, {**item, **change}), change
    batch = _batch_records()[1].to_item()
    assert "last_event_ms" not in batch and errors(validator, batch) == []
    assert errors(validator, {**batch, "source_offsets": {"transactions-0": 1}})      # batch: no offsets
    assert not errors(item_validator(strict_fields=False), {**batch, "added_later": True})
