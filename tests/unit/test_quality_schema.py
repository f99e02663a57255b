"""The quality summary record's JSON Schema is valid, its example passes, the records the monitor
builds pass, and it refuses what the contract rules out."""
from __future__ import annotations

import json

from models.config import REPO_ROOT
from streaming.quality import Tally
from streaming.quality_job import SUMMARY_SCHEMA_VERSION, summary_record

SCHEMA = REPO_ROOT / "docs" / "quality-summary.schema.json"


def validator():
    from jsonschema import Draft202012Validator

    schema = json.loads(SCHEMA.read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def test_the_schema_is_valid_and_its_example_and_the_built_records_pass():
    check = validator()
    schema = json.loads(SCHEMA.read_text())
    assert schema["properties"]["schema_version"]["const"] == SUMMARY_SCHEMA_VERSION
    assert all(not list(check.iter_errors(example)) for example in schema["examples"])
    tally = Tally()
    tally.add("v1", "personalized", 3, 1, 2)
    tally.add("v1", "segment_popularity", 0, 0, 0)
    record = summary_record(tally, 1_767_607_200_000, 1_767_607_260_000, 10)
    assert list(check.iter_errors(json.loads(json.dumps(record)))) == []
    assert record["groups"][0]["hit_rate"] == round(1 / 3, 6) and record["groups"][1]["hit_rate"] is None


def test_the_schema_refuses_a_broken_record():
    check = validator()
    record = summary_record(Tally(), 0, 1, 10)
    assert list(check.iter_errors(record)) == []
    for broken in ({**record, "schema_version": 2}, {**record, "k": 0},
                   {**record, "groups": [{"model_version": "v", "strategy": "other", "judged": 1, "hits": 0,
                                          "hit_rate": 0, "baseline_hits": 0, "baseline_hit_rate": 0}]},
                   {key: value for key, value in record.items() if key != "groups"}):
        assert list(check.iter_errors(broken)), broken
