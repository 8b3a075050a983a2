"""`distill` stage: a small ViTPose student learns from a trained teacher (the champion by default).

The two parts of ViTPose's knowledge-token distillation (``vitpose_core.distill``) run as two Ray Train
runs of the shared training loop (``pipelines.training``), each resumable on its own:

1. ``distill_token`` (when ``distill.knowledge_token``): the teacher, frozen, plus one learnable
   token, trained on the ground-truth heatmap loss (``FinetuneTask`` on a ``TokenTeacher``); the token
   is exported as ``token.safetensors``.
2. ``distill``: the student with the frozen token appended to its patch tokens (through the fixed
   width projection when widths differ) and, when ``distill.output_weight > 0``, MSE to the teacher's
   heatmaps (``DistillTask``). Validation and export are the finetune stage's, applied to the plain
   student: the deployed student carries no token and has the serving cost of any model of its size.

The stage registers nothing: the student is a candidate of the register stage (``vitpose register``),
and its record carries the teacher's registry version and source.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines import storage
from pipelines.contract import StageOutput
from pipelines.distill.config import DistillConfig
from pipelines.finetune.run import build_finetune_model, export_best, validate
from pipelines.session import connect_ray
from pipelines.training.recipe import TrainingRecipe, check_schedule, export_uri, run_name, train_rows
from pipelines.training.result import run_training
from pipelines.training.trainer import fit
from vitpose_core.checkpoint import load_model
from vitpose_core.distill import (
    DistillTask,
    TokenTeacher,
    deployable_student,
    freeze,
    init_student_from_teacher,
    student_for_training,
)
from vitpose_core.engine import FinetuneTask
from vitpose_core.models import build_model

logger = logging.getLogger(__name__)
TOKEN_FILE = "token.safetensors"


# ------------------------------------------------------------------------------ worker-side builders


def load_teacher(config: DistillConfig) -> nn.Module:
    return freeze(load_model(storage.local_dir(config.teacher_checkpoint)))


class LazyTeacher(nn.Module):
    """The frozen teacher, loaded on first use in the worker, so the pickled stage stays small."""

    def __init__(self, checkpoint: str) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self._model: nn.Module | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self._model is None:
            self._model = freeze(load_model(storage.local_dir(self.checkpoint))).to(images.device)
        return self._model(images)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None}


def build_token_teacher(config: DistillConfig) -> nn.Module:
    return TokenTeacher(load_teacher(config), config.distill.num_tokens)


def export_token(model: nn.Module, config: DistillConfig, directory: Path, metadata: dict[str, Any]) -> None:
    tokens = model.knowledge_token.tokens.detach().cpu().contiguous()
    save_file({"tokens": tokens}, str(directory / TOKEN_FILE), metadata={"teacher": config.teacher})


def build_student(config: DistillConfig) -> nn.Module:
    student = build_model(config.model.variant, **config.model.overrides(),
                          **{k: v for k, v in config.student.model_dump().items() if v is not None})
    if config.model.pretrained:
        student = build_finetune_model(config)
    if config.distill.init_from_teacher:
        copied = init_student_from_teacher(student, load_teacher(config))
        logger.info("student initialised from the teacher: %d tensors copied", len(copied))
    tokens = None
    if config.distill.knowledge_token:
        tokens = load_file(str(storage.local_dir(config.token_checkpoint) / TOKEN_FILE))["tokens"]
    return student_for_training(student, tokens, config.distill.projection_seed)


def validate_student(model: nn.Module, config: DistillConfig, tracker: Any, epoch: int) -> dict[str, float]:
    return validate(deployable_student(model), config, tracker, epoch)


def export_student(model: nn.Module, config: DistillConfig, directory: Path, metadata: dict[str, Any]) -> None:
    export_best(deployable_student(model), config, directory,
                {**metadata, "teacher": config.teacher, "distill": config.distill.model_dump()})


def token_stage_config(config: DistillConfig) -> DistillConfig:
    """Stage 1's config: the token's own short schedule and lr, no weight decay on the token."""
    schedule = config.schedule.model_copy(update={"epochs": config.distill.token_epochs, "max_steps":
                                                  config.distill.token_max_steps, "kind": "constant"})
    optim = config.optim.model_copy(update={"lr": config.distill.token_lr, "weight_decay": 0.0, "layer_decay": 1.0})
    name = f"{run_name(student_recipe(config), config)}-token"
    checkpoint = config.checkpoint.model_copy(update={"name": name})
    return config.model_copy(update={"schedule": schedule, "optim": optim, "checkpoint": checkpoint})


TOKEN_RECIPE = TrainingRecipe(name="distill_token", task=FinetuneTask(), build_model=build_token_teacher,
                              export=export_token)


def student_recipe(config: DistillConfig) -> TrainingRecipe:
    teacher = LazyTeacher(config.teacher_checkpoint) if config.distill.output_weight > 0 else None
    task = DistillTask(teacher=teacher, output_weight=config.distill.output_weight, gt_weight=config.distill.gt_weight)
    # a TokenStudent names its ViT `student.backbone`; layer-wise lr decay must find it
    prefix = "student.backbone." if config.distill.knowledge_token else "backbone."
    return TrainingRecipe(name="distill", task=task, build_model=build_student, export=export_student,
                          validate=validate_student, best_metric="val_AP", backbone_prefix=prefix)


# ---------------------------------------------------------------------------------------- driver


def resolve_teacher(config: DistillConfig) -> tuple[DistillConfig, dict[str, Any]]:
    """Fetch the teacher (registry alias, run or path) to ``<out>/teacher``; returns the updated config."""
    import tempfile

    from pipelines import registry
    from pipelines.tracking import resolve_tracking

    tracking_uri = resolve_tracking(config.tracking, config.out).get("tracking_uri")
    with tempfile.TemporaryDirectory() as tmp:
        # any source: a registry alias or version, a run's model, a local or s3:// checkpoint
        resolved = registry.resolve_model(config.teacher, tracking_uri, tmp)
        teacher_uri = storage.join(storage.normalize(config.out), "teacher")
        storage.copy_dir(resolved.path, teacher_uri)
    teacher_config = load_model(storage.local_dir(teacher_uri)).config
    if config.distill.knowledge_token and teacher_config.attention != "full":
        raise ValueError(f"the knowledge token needs a full-attention teacher; {config.teacher} uses "
                         f"{teacher_config.attention!r} (set distill.knowledge_token=false)")
    update: dict[str, Any] = {"teacher_checkpoint": teacher_uri}
    if "input_size" not in config.model.model_fields_set:  # default: the teacher's resolution
        update["model"] = config.model.model_copy(update={"input_size": teacher_config.input_size})
    info = {"teacher_name": resolved.name, "teacher_version": resolved.version, "teacher_source": resolved.source}
    return config.model_copy(update=update), info


def check_schedules(config: DistillConfig) -> None:
    """Both Train runs' warm-up against their step totals, before stage 1 trains (``fit`` checks each
    again when it starts; this catches a bad student schedule before the token stage's training is spent)."""
    if not config.data.shards:
        return  # fit names the missing shards
    rows = train_rows(config.data.shards)
    if config.distill.knowledge_token:
        try:
            check_schedule(TOKEN_RECIPE.name, token_stage_config(config), rows)
        except ValueError as error:
            raise ValueError(f"{error} (the token stage's schedule.epochs and max_steps are distill.token_epochs="
                             f"{config.distill.token_epochs} and distill.token_max_steps="
                             f"{config.distill.token_max_steps})") from None
    check_schedule("distill", config, rows)


def run_distill(config: DistillConfig) -> StageOutput:
    """Stage 1 (token), then stage 2 (student). The record names the student's best-val-AP export."""
    connect_ray()
    checkpoint = config.checkpoint.model_copy(update={"storage_path": storage.join(storage.normalize(config.out),
                                                                                   "runs")})
    check_schedules(config)
    config, teacher = resolve_teacher(config.model_copy(update={"checkpoint": checkpoint}))
    if config.distill.knowledge_token:
        token_config = token_stage_config(config)
        fit(TOKEN_RECIPE, token_config)
        config = config.model_copy(update={"token_checkpoint": export_uri(TOKEN_RECIPE, token_config)})
    recipe = student_recipe(config)
    output = run_training(recipe, config)
    output.outputs.update(teacher, token_checkpoint=config.token_checkpoint)
    return output
