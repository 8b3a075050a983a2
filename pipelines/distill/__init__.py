"""The distill stage: knowledge-token + output distillation of a trained ViTPose into a small student.

`config` (DistillConfig), `run` (run_distill), `spec` (its place in `vitpose run`, teacher choice),
`command` (`vitpose distill`).
"""
