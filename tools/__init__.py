"""The tools users meet: the replay producer, topic tails, the table lookup and refill (and the demo).

Each is a ``python -m tools.<name>`` command with exit codes a script can rely on:
0 success, 1 nothing found, 2 bad arguments or input, 3 a service that cannot be reached,
130 interrupted by Ctrl-C.
"""
from __future__ import annotations

from typing import Any

from models.config import Config

EXIT_OK = 0
EXIT_NOTHING = 1
EXIT_BAD_INPUT = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130   # Ctrl-C, as shells report it


class ServiceUnreachable(RuntimeError):
    """Kafka or DynamoDB did not answer; the message names the address that was tried."""


def bootstrap_options(client_class: type, timeout_s: float) -> dict[str, Any]:
    """Keyword arguments bounding how long a kafka-python client waits for the first broker.

    kafka-python 3 calls the setting ``bootstrap_timeout_ms``; 2.x bounds the version probe
    instead. Without either a dead broker costs 30 s or more before anyone is told.
    """
    known = getattr(client_class, "DEFAULT_CONFIG", {})
    for name in ("bootstrap_timeout_ms", "api_version_auto_timeout_ms"):
        if name in known:
            return {name: int(timeout_s * 1000)}
    return {}


def kafka_unreachable(cfg: Config, err: Exception) -> ServiceUnreachable:
    servers = cfg.get_path("kafka.bootstrap_servers")
    detail = str(err) if type(err).__name__ in str(err) else f"{type(err).__name__}: {err}"
    protocol = str((cfg.get_path("kafka.client_options", {}) or {}).get("security.protocol", ""))
    # kafka-python reports a refused SASL login only as a failed bootstrap: name that cause too.
    credentials = (" or the broker refused the credentials (check sasl.mechanism and the user and password "
                   "in kafka.client_options' sasl.jaas.config)" if protocol.startswith("SASL") else "")
    return ServiceUnreachable(
        f"cannot reach the Kafka broker at {servers} ({detail}){credentials}; start it "
        f"(python -m infra start) or set kafka.bootstrap_servers / RECO__KAFKA__BOOTSTRAP_SERVERS")


def exit_for(err: Exception) -> int:
    """Print a tool's failure in one line on stderr; its exit code (3 unreachable, else 2 bad input)."""
    import sys

    print(f"error: {err}", file=sys.stderr)
    return EXIT_UNREACHABLE if isinstance(err, ServiceUnreachable) else EXIT_BAD_INPUT


def quiet_client_logs() -> None:
    """Command-line logging: warnings only, and none from the clients' retry loops.

    The tools report an unreachable service themselves, in one line naming the address.
    """
    import logging

    from models.logging_setup import setup_logging

    setup_logging("WARNING")
    for name in ("kafka", "botocore", "urllib3"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
