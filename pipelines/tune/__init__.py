"""The tune stage: Ray Tune (ASHA) over the finetune stage: resolution, attention, lr, layer decay, drop path.

`config` (TuneConfig, search axes, trial configs), `run` (run_tune), `spec` (its place in `vitpose run`),
`command` (`vitpose tune`).
"""
