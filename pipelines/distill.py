"""`distill` stage: a small ViTPose student learns from a trained teacher (the champion by default).

The two parts of ViTPose's knowledge-token distillation (``vitpose_core.distill``) run as two Ray Train
runs of the shared training loop (``pipelines.train``), each resumable on its own:

1. ``distill_token`` (when ``distill.knowledge_token``): the teacher, frozen, plus one learnable
   token, trained on the ground-truth heatmap loss (``FinetuneTask`` on a ``TokenTeacher``); the token
   is exported as ``token.safetensors``.
2. ``distill``: the student with the frozen token appended to its patch tokens (through the fixed
   width projection when widths differ) and, when ``distill.output_weight > 0``, MSE to the teacher's
   heatmaps (``DistillTask``). Validation and export are the finetune stage's, applied to the plain
   student: the deployed student carries no token and has the serving cost of any model of its size.

The student is registered like any model (``pipelines.champion``), with the teacher's registry
version, source and the distillation switches as model-version tags.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines import storage
from pipelines.config import StrictConfig
from pipelines.finetune import FinetuneConfig, build_finetune_model, export_best, validate
from pipelines.train import (
    Stage,
    check_schedule,
    download_dir,
    run_name,
    run_stage,
    run_uri,
    train_rows,
    upload_dir,
)
from pipelines.tune import RegistrySection
from vitpose_core.checkpoint import load_model
from vitpose_core.distill import DistillTask, TokenTeacher, deployable_student, freeze, student_for_training
from vitpose_core.engine import FinetuneTask
from vitpose_core.models import build_model

logger = logging.getLogger(__name__)
TOKEN_FILE = "token.safetensors"


class StudentArch(StrictConfig):
    """Width/depth overrides of ``model.variant`` for students smaller than any named variant."""

    embed_dim: int | None = Field(None, ge=8)
    depth: int | None = Field(None, ge=1)
    num_heads: int | None = Field(None, ge=1)
    mlp_hidden_dim: int | None = Field(None, ge=8)
    decoder_channels: int | None = Field(None, ge=8)


class DistillSection(StrictConfig):
    knowledge_token: bool = Field(True, description="stage 1 + token appended to the student (paper eq. 3-4)")
    num_tokens: int = Field(1, ge=1)
    token_epochs: int = Field(1, ge=1, description="stage-1 epochs over the train shards")
    token_max_steps: int | None = Field(None, ge=1)
    token_lr: float = Field(1e-3, gt=0)
    output_weight: float = Field(1.0, ge=0, description="weight of MSE(student, teacher) heatmaps; 0 = off")
    gt_weight: float = Field(1.0, ge=0)
    projection_seed: int = 0


class DistillConfig(FinetuneConfig):
    """The finetune sections (``model`` = the student) plus teacher, switches, output and registry."""

    out: str = Field(..., description="output directory: Train runs (checkpoint.storage_path) and the teacher copy")
    teacher: str = Field("models:/vitpose@champion", description="models:/..., runs:/... or a checkpoint path")
    student: StudentArch = StudentArch()
    distill: DistillSection = DistillSection()
    registry: RegistrySection = RegistrySection(model_name="vitpose-student")
    teacher_checkpoint: str | None = Field(None, description="set by run_distill: the teacher where workers read it")
    token_checkpoint: str | None = Field(None, description="set by run_distill: stage 1's exported token")

    @model_validator(mode="before")
    @classmethod
    def _pipeline_fields(cls, data: Any) -> Any:
        # the pipeline injects `shards` at the top level; the training loop reads data.shards
        if isinstance(data, dict) and "shards" in data:
            data = copy.deepcopy(data)
            data.setdefault("data", {})["shards"] = data.pop("shards")
        return data

    @model_validator(mode="after")
    def _token_stage_warmup(self) -> DistillConfig:
        # stage 1 runs with the student's schedule.warmup_steps (token_stage_config) but its own step budget
        token_steps = self.distill.token_max_steps
        if self.distill.knowledge_token and token_steps is not None and self.schedule.warmup_steps > token_steps:
            raise ValueError(f"schedule.warmup_steps ({self.schedule.warmup_steps}) is larger than "
                             f"distill.token_max_steps ({token_steps}); the token stage uses the same warm-up, "
                             f"so set warmup_steps <= {token_steps} or raise token_max_steps")
        return self


# ------------------------------------------------------------------------------ worker-side builders


def local_dir(uri: str) -> Path:
    """A local directory for ``uri`` (downloaded to a temporary directory when it is on s3://)."""
    return download_dir(uri, Path(tempfile.mkdtemp(prefix="vitpose-"))) if storage.is_s3(uri) else Path(uri)


def load_teacher(config: DistillConfig) -> nn.Module:
    return freeze(load_model(local_dir(config.teacher_checkpoint)))


class LazyTeacher(nn.Module):
    """The frozen teacher, loaded on first use in the worker, so the pickled stage stays small."""

    def __init__(self, checkpoint: str) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self._model: nn.Module | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self._model is None:
            self._model = freeze(load_model(local_dir(self.checkpoint))).to(images.device)
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
    tokens = None
    if config.distill.knowledge_token:
        tokens = load_file(str(local_dir(config.token_checkpoint) / TOKEN_FILE))["tokens"]
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
    name = f"{run_name(Stage('distill', FinetuneTask(), build_student, export_student), config)}-token"
    checkpoint = config.checkpoint.model_copy(update={"name": name})
    return config.model_copy(update={"schedule": schedule, "optim": optim, "checkpoint": checkpoint})


TOKEN_STAGE = Stage(name="distill_token", task=FinetuneTask(), build_model=build_token_teacher, export=export_token)


def student_stage(config: DistillConfig) -> Stage:
    teacher = LazyTeacher(config.teacher_checkpoint) if config.distill.output_weight > 0 else None
    task = DistillTask(teacher=teacher, output_weight=config.distill.output_weight, gt_weight=config.distill.gt_weight)
    # a TokenStudent names its ViT `student.backbone`; layer-wise lr decay must find it
    prefix = "student.backbone." if config.distill.knowledge_token else "backbone."
    return Stage(name="distill", task=task, build_model=build_student, export=export_student,
                 validate=validate_student, best_metric="val_AP", backbone_prefix=prefix)


# ---------------------------------------------------------------------------------------- driver


def resolve_teacher(config: DistillConfig) -> tuple[DistillConfig, dict[str, Any]]:
    """Fetch the teacher (registry alias, run or path) to ``<out>/teacher``; returns the updated config."""
    from pipelines import registry
    from pipelines.tracking import resolve_tracking

    tracking_uri = resolve_tracking(config.tracking, config.out).get("tracking_uri")
    with tempfile.TemporaryDirectory() as tmp:
        resolved = registry.resolve_model(config.teacher, tracking_uri, tmp)
        teacher_uri = storage.join(storage.normalize(config.out), "teacher")
        upload_dir(resolved.path, teacher_uri)
    teacher_config = load_model(local_dir(teacher_uri)).config
    if config.distill.knowledge_token and teacher_config.attention != "full":
        raise ValueError(f"the knowledge token needs a full-attention teacher; {config.teacher} uses "
                         f"{teacher_config.attention!r} (set distill.knowledge_token=false)")
    update: dict[str, Any] = {"teacher_checkpoint": teacher_uri}
    if "input_size" not in config.model.model_fields_set:  # default: the teacher's resolution
        height, width = teacher_config.img_size
        update["model"] = config.model.model_copy(update={"input_size": (width, height)})
    info = {"teacher_name": resolved.name, "teacher_version": resolved.version, "teacher_source": resolved.source}
    return config.model_copy(update=update), info


def check_schedules(config: DistillConfig) -> None:
    """Both Train runs' warm-up against their step totals, before stage 1 trains (``run_stage`` checks each
    again when it starts; this catches a bad student schedule before the token stage's training is spent)."""
    if not config.data.shards:
        return  # run_stage names the missing shards
    rows = train_rows(config.data.shards)
    if config.distill.knowledge_token:
        try:
            check_schedule(TOKEN_STAGE.name, token_stage_config(config), rows)
        except ValueError as error:
            raise ValueError(f"{error} (the token stage's schedule.epochs and max_steps are distill.token_epochs="
                             f"{config.distill.token_epochs} and distill.token_max_steps="
                             f"{config.distill.token_max_steps})") from None
    check_schedule("distill", config, rows)


def run_distill(config: DistillConfig) -> dict[str, Any]:
    """Stage 1 (token), stage 2 (student), then registration. Returns the stage record."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False)
    checkpoint = config.checkpoint.model_copy(update={"storage_path": storage.join(storage.normalize(config.out),
                                                                                   "runs")})
    check_schedules(config)
    config, teacher = resolve_teacher(config.model_copy(update={"checkpoint": checkpoint}))
    if config.distill.knowledge_token:
        token_config = token_stage_config(config)
        run_stage(TOKEN_STAGE, token_config)
        config = config.model_copy(update={"token_checkpoint": storage.join(run_uri(TOKEN_STAGE, token_config),
                                                                            "distill_token_export")})
    stage = student_stage(config)
    result = run_stage(stage, config)
    student_uri = storage.join(run_uri(stage, config), "distill_export")
    summary = result.return_value or {}
    record: dict[str, Any] = {"checkpoint": student_uri, **teacher, "token_checkpoint": config.token_checkpoint,
                              "metrics": {"ap": summary.get("best"), "val_AP": summary.get("best")},
                              "mlflow_run_id": summary.get("mlflow_run_id")}
    if config.registry.enabled and summary.get("mlflow_run_id") and config.tracking.enabled:
        from pipelines.champion import register_and_maybe_promote, val_ap_scorer
        from pipelines.tracking import resolve_tracking

        tracking_uri = resolve_tracking(config.tracking, run_uri(stage, config))["tracking_uri"]
        registration = register_and_maybe_promote(
            local_dir(student_uri), val_ap_scorer(config), model_name=config.registry.model_name,
            alias=config.registry.alias, tracking_uri=tracking_uri, run_id=summary["mlflow_run_id"],
            tags={"stage": "distill", **teacher, "knowledge_token": str(config.distill.knowledge_token),
                  "output_weight": str(config.distill.output_weight)})
        record.update(registry=registration, version=registration["candidate_version"])
    return record
