"""python -m tools.lookup CUSTOMER_ID [--json]: the customer's current top-10 from the DynamoDB table.

What the serving side would read: one item per customer, kept newest-wins by both jobs. With
--json, the item as JSON (DynamoDB Numbers as JSON numbers), as docs/recommendation-item.schema.json
describes it (a field that is null on the topic is absent).
Exit codes: 0 printed, 1 the customer has no item, 2 bad arguments, 3 the endpoint cannot be
reached or the table does not exist.
"""
from __future__ import annotations

import argparse
import json
import sys
from decimal import Decimal
from typing import Any

from models.config import Config, ConfigError, load_config
from models.records import iso_utc
from tools import EXIT_NOTHING, EXIT_OK, ServiceUnreachable, exit_for, quiet_client_logs


def _where(cfg: Config) -> str:
    endpoint = cfg.get_path("dynamodb.endpoint_url", None) or f"AWS DynamoDB ({cfg.get_path('dynamodb.region')})"
    return f"table {cfg.get_path('dynamodb.table')!r} at {endpoint}"


def lookup(cfg: Config, customer_id: str) -> dict | None:
    """The stored item, or None; ServiceUnreachable when the endpoint or the table is not there."""
    from botocore.exceptions import BotoCoreError, ClientError

    from models.records import read_table_item

    try:
        return read_table_item(cfg, customer_id)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
            raise ServiceUnreachable(f"{_where(cfg)} does not exist: create it with `python -m infra init` "
                                     f"or set dynamodb.table / RECO__DYNAMODB__TABLE") from None
        raise
    except BotoCoreError as err:  # connection refused, timeouts, unknown host
        raise ServiceUnreachable(f"cannot reach {_where(cfg)} ({type(err).__name__}: {err}); start it "
                                 f"(python -m infra start) or set RECO__DYNAMODB__ENDPOINT_URL") from None


def _plain(value: Any) -> Any:
    """DynamoDB values (Decimal) as JSON ones: whole numbers as int, others as float."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def format_item(item: dict) -> str:
    item = _plain(item)
    recs = sorted(item.get("recommendations") or [], key=lambda r: r.get("rank", 0))
    last_event = item.get("last_event_time") or iso_utc(item.get("last_event_ms") or None) or "-"
    lines = [f"customer {item.get('customer_id')}: {len(recs)} recommendations "
             f"({item.get('strategy', '?')}, model {item.get('model_version', '?')}, "
             f"from the {item.get('source', '?')} job)",
             f"  newest purchase reflected: {last_event}; computed at {item.get('computed_at', '-')}"]
    lines += [f"  {r.get('rank', i):>3}. {r.get('product_id')}  {float(r.get('score') or 0):.4f}"
              for i, r in enumerate(recs, 1)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.lookup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("customer_id")
    parser.add_argument("--json", action="store_true",
                        help="print the stored item as JSON (docs/recommendation-item.schema.json)")
    args = parser.parse_args(argv)
    quiet_client_logs()
    try:
        cfg = load_config()
        item = lookup(cfg, args.customer_id)
    except (ConfigError, ServiceUnreachable) as err:
        return exit_for(err)
    if item is None:
        print(f"no recommendations stored for customer {args.customer_id!r} in {_where(cfg)}", file=sys.stderr)
        return EXIT_NOTHING
    print(json.dumps(_plain(item), sort_keys=True) if args.json else format_item(item))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
