"""The shard stage: keypoint annotations + images -> Parquet person-crop shards + manifest, on Ray Data.

`config` (ShardConfig), `crops` (the per-image crop task), `run` (run_shard), `spec` (its place in
`vitpose run`), `command` (`vitpose shard`).
"""
