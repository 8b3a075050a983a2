"""The pretrain stage: MAE on the ViT backbone over the pose data's own crops, on Ray Train.

`config` (PretrainConfig), `run` (run_pretrain), `spec` (its place in `vitpose run`), `command`
(`vitpose pretrain`).
"""
