"""The register stage: the one place that registers models and moves the champion alias.

`config` (RegisterConfig), `run` (score candidates and the champion on one val set, register, promote),
`spec` (its place in `vitpose run`), `command` (`vitpose register`).
"""
