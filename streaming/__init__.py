"""The streaming scorer: Kafka purchase events in, refreshed top-k recommendations out."""
