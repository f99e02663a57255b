"""The output contract's JSON Schemas (docs/recommendation-*.schema.json) as validators for tests.

``record_validator`` checks topic messages (parsed JSON); ``item_validator`` checks table items
as boto3 reads them, Decimal numbers included (an integral Decimal counts as a JSON integer,
which is what the number is in DynamoDB). ``strict=True`` also refuses fields the schema does not
name, so a field the code writes but the contract does not document fails the test; the published
schemas themselves allow unknown fields (consumers ignore them).
"""
from __future__ import annotations

import copy
import json
from decimal import Decimal

from models.config import REPO_ROOT

RECORD_SCHEMA = REPO_ROOT / "docs" / "recommendation-record.schema.json"
ITEM_SCHEMA = REPO_ROOT / "docs" / "recommendation-item.schema.json"


def load_schema(path) -> dict:
    return json.loads(path.read_text())


def strict(schema: dict) -> dict:
    """The schema with unknown fields refused, at the top and in the ranked-list entries."""
    schema = copy.deepcopy(schema)
    schema["additionalProperties"] = False
    for definition in schema.get("$defs", {}).values():
        if definition.get("type") == "object":
            definition["additionalProperties"] = False
    return schema


def _validator_class():
    from jsonschema import Draft202012Validator
    from jsonschema.validators import extend

    base = Draft202012Validator.TYPE_CHECKER

    def is_integer(checker, value) -> bool:
        if isinstance(value, Decimal):
            return value.is_finite() and value == value.to_integral_value()
        return base.is_type(value, "integer")

    def is_number(checker, value) -> bool:
        if isinstance(value, Decimal):
            return value.is_finite()
        return base.is_type(value, "number")

    return extend(Draft202012Validator,
                  type_checker=base.redefine_many({"integer": is_integer, "number": is_number}))


def record_validator(strict_fields: bool = True):
    schema = load_schema(RECORD_SCHEMA)
    return _validator_class()(strict(schema) if strict_fields else schema)


def item_validator(strict_fields: bool = True):
    schema = load_schema(ITEM_SCHEMA)
    return _validator_class()(strict(schema) if strict_fields else schema)


def errors(validator, instance) -> list[str]:
    """Every violation, one line each (empty when the instance is valid)."""
    return [f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
            for error in validator.iter_errors(instance)]


def plain(value):
    """An item's Decimals as JSON numbers (integral ones as int), like `tools.lookup --json`."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def without_nulls(message: dict) -> dict:
    """The message as the table stores it: a null field is absent."""
    return {k: v for k, v in message.items() if v is not None}


def every_strategy_scoring(after_ms: int):
    """(model, customers, scored) where the stream's scoring yields every strategy: a known
    customer (personalized), a new one in a segment the model knows (segment_popularity), one in
    a segment it does not (popularity), and one whose record carries no source offsets."""
    import numpy as np
    import pandas as pd

    from streaming.refresh import score_customers
    from streaming.serving import ServingModel
    from tests.small_models import small_als

    artifact = small_als()
    artifact.params = {**artifact.params, "segment_column": "country",
                       "segment_popularity": {"FR": {"items": [4, 2], "buyers": [3.0, 1.0]}}}
    model = ServingModel.prepare(artifact.validate())
    frame = pd.DataFrame({
        "customer_id": ["K1", "NEW-FR", "NEW", "REFILLED"],
        "product_ids": [["P1", "P3"], ["UNKNOWN"], ["UNKNOWN"], ["P2"]],
        "quantities": [[2, 1], [1], [1], [1]],
        "event_times_ms": [[after_ms, after_ms + 5], [after_ms], [after_ms], [after_ms]],
        "source_offsets": [{"transactions-0": 7, "transactions-1": 3}, {"transactions-1": 4},
                           {"transactions-0": 9}, None]})
    scored = score_customers(model, frame, k=3, exclude_purchased=True,
                             segments=np.array([None, "FR", "XX", None], dtype=object))
    return model, frame, scored
