"""The detect stage: a person detector trained on the shard stage's images, registered beside the pose model.

`config` (DetectConfig), `run` (train in a Ray task, box AP on val, register, promote), `spec` (its place in
`vitpose run`: optional, after shard), `command` (`vitpose detect`), `images` (the shard set's source images).
"""
