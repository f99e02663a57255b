"""The model contract shared by the batch and the streaming jobs.

The versioned model store, the artifact format, the scoring math (fold-in and top-k), the
output record format and its writers, and the shared plumbing (configuration, Spark session).
"""
