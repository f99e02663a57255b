"""The batch training job."""
