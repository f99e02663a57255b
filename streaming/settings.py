"""The ``streaming`` config section, read once and checked, so a typo fails at start-up."""
from __future__ import annotations

import re
from dataclasses import dataclass

from models.config import Config, ConfigError, resolve_path

_UNITS_MS = {"ms": 1, "millisecond": 1, "s": 1000, "sec": 1000, "second": 1000, "m": 60_000,
             "min": 60_000, "minute": 60_000, "h": 3_600_000, "hour": 3_600_000, "d": 86_400_000,
             "day": 86_400_000}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")


def duration_ms(value, name: str = "duration") -> int:
    """``"2 seconds"``, ``"90 days"``, ``"500ms"``, ``"1h"`` or a number of seconds -> milliseconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: {value!r} is not a duration; write e.g. '2 seconds' or '90 days'")
    if isinstance(value, (int, float)):
        return int(value * 1000)
    match = _DURATION.match(str(value).lower())
    unit = (match.group(2) or "s") if match else None
    if unit not in _UNITS_MS and unit and unit.endswith("s"):
        unit = unit[:-1]  # plurals: "seconds", "days"
    if not match or unit not in _UNITS_MS:
        raise ConfigError(f"{name}: {value!r} is not a duration; write e.g. '2 seconds' or '90 days'")
    return int(float(match.group(1)) * _UNITS_MS[unit])


@dataclass(frozen=True)
class StreamingSettings:
    k: int
    trigger_interval_ms: int
    dead_letter_trigger_interval_ms: int
    checkpoint_dir: str               # a folder, or a URI Spark understands (hdfs://, s3a://)
    state_ttl_ms: int
    state_partitions: int
    exclude_purchased: bool
    starting_offsets: str
    max_offsets_per_trigger: int | None
    model_poll_interval_ms: int
    sink_outage_tolerance_ms: int     # how long a sink may fail before the job gives up
    metrics_host: str
    metrics_port: int | None          # None: no metrics endpoint; 0: any free port
    health_max_silence_ms: int        # /healthz fails when a query reported nothing for this long
    transactions_topic: str
    dead_letter_topic: str
    recommendations_topic: str
    quality_enabled: bool             # the reco-quality query (streaming/quality_job.py)
    quality_trigger_interval_ms: int
    quality_summary_interval_ms: int  # how often a summary record goes to the quality topic
    quality_topic: str

    @classmethod
    def from_config(cls, cfg: Config) -> StreamingSettings:
        checkpoint_text = cfg.text("streaming.checkpoint_dir")
        checkpoint = checkpoint_text if "://" in checkpoint_text else str(resolve_path(checkpoint_text))
        starting = str(cfg.get_path("streaming.starting_offsets"))
        if starting not in ("earliest", "latest") and not starting.startswith("{"):
            raise ConfigError(f"streaming.starting_offsets: {starting!r} must be earliest, latest "
                              "or a JSON offsets object")
        cap = cfg.get_path("streaming.max_offsets_per_trigger", None)
        k = int(cfg.get_path("streaming.k"))
        if k < 1:
            raise ConfigError(f"streaming.k: {k} must be at least 1")
        partitions = int(cfg.get_path("streaming.state_partitions", 2))
        if partitions < 1:
            raise ConfigError(f"streaming.state_partitions: {partitions} must be at least 1")
        return cls(
            k=k,
            trigger_interval_ms=duration_ms(cfg.get_path("streaming.trigger_interval"), "streaming.trigger_interval"),
            dead_letter_trigger_interval_ms=duration_ms(
                cfg.get_path("streaming.dead_letter_trigger_interval", "10 seconds"),
                "streaming.dead_letter_trigger_interval"),
            checkpoint_dir=checkpoint,
            state_ttl_ms=duration_ms(cfg.get_path("streaming.state_ttl"), "streaming.state_ttl"),
            state_partitions=partitions,
            exclude_purchased=bool(cfg.get_path("streaming.exclude_purchased")),
            starting_offsets=starting,
            max_offsets_per_trigger=None if cap in (None, "", 0) else int(cap),
            model_poll_interval_ms=duration_ms(cfg.get_path("streaming.model_poll_interval"),
                                               "streaming.model_poll_interval"),
            sink_outage_tolerance_ms=duration_ms(cfg.get_path("streaming.sink_outage_tolerance"),
                                                 "streaming.sink_outage_tolerance"),
            metrics_host=str(cfg.get_path("streaming.metrics.host")),
            metrics_port=None if cfg.get_path("streaming.metrics.port") is None
            else int(cfg.get_path("streaming.metrics.port")),
            health_max_silence_ms=duration_ms(cfg.get_path("streaming.metrics.health_max_silence"),
                                              "streaming.metrics.health_max_silence"),
            transactions_topic=str(cfg.get_path("kafka.topics.transactions")),
            dead_letter_topic=str(cfg.get_path("kafka.topics.dead_letter")),
            recommendations_topic=str(cfg.get_path("kafka.topics.recommendations")),
            quality_enabled=bool(cfg.get_path("streaming.quality.enabled")),
            quality_trigger_interval_ms=duration_ms(cfg.get_path("streaming.quality.trigger_interval"),
                                                    "streaming.quality.trigger_interval"),
            quality_summary_interval_ms=duration_ms(cfg.get_path("streaming.quality.summary_interval"),
                                                    "streaming.quality.summary_interval"),
            quality_topic=str(cfg.get_path("kafka.topics.quality")),
        )
