"""The labeling pipeline: shards in object storage -> CASS on Ray actors -> Parquet labels.

Stages (one job each): :mod:`~pipeline.shards` lists input shards, :mod:`~pipeline.readers`
streams their bytes, :mod:`~pipeline.decode` makes RGB arrays, the engine labels them,
:mod:`~pipeline.encode` builds rows, :mod:`~pipeline.writer` writes one Parquet file and a
completion record per shard. :mod:`~pipeline.worker` chains them for one shard;
:mod:`~pipeline.pool` and :mod:`~pipeline.runner` compose them on Ray, and
:mod:`~pipeline.scheduler` decides what runs where (retries, replacements, stalls through
:mod:`~pipeline.watchdog`). Importing this package imports neither Ray nor torch;
:mod:`pipeline.runner`, :mod:`pipeline.scheduler` and :mod:`pipeline.pool` import Ray.
"""
