"""Ray Train for every training stage: one recipe type, one per-worker loop, one trainer builder.

- `recipe`: `TrainingRecipe` (what differs between stages) and the schedule arithmetic;
- `loop`: the per-worker loop (typed `TrainProgress`, checkpoints, rank-0 validation and export);
- `fsdp`: DDP / FSDP2 wrapping, the full state they gather and its loading on resume;
- `trainer`: `build_trainer` / `fit`, a recipe + config -> a resumable `TorchTrainer` run;
- `sections`: the config sections the training stages compose (model, data, optim, schedule, ...);
- `command`: the arguments the training commands share.
"""
