"""The finetune stage: ViTPose (backbone + heatmap decoder) on the crop shards, on Ray Train.

`config` (FinetuneConfig), `run` (run_finetune, the validation that scores every model), `spec`
(its place in `vitpose run`), `command` (`vitpose finetune`).
"""
