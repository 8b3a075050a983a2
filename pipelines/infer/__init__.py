"""Offline pose inference over many images or a video's frames: `vitpose infer` (Ray Data, an actor pool).

- `config.py`  `InferConfig`: what to read, which model and boxes, where to write, how many actors;
- `inputs.py`  the inputs (a folder, an s3:// prefix, a video) -> image ids and parts, boxes, part keys;
- `worker.py`  `PoseWorker`: the Ray Data actor (reads a part's images, finds boxes, poses, renders);
- `job.py`     `run_infer`: skips finished parts, runs the rest, merges `results.json` + `images.json`.

The command is `pipelines/commands/infer.py`; docs/inference.md describes outputs and resume.
"""
