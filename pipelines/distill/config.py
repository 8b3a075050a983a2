"""The distill stage's config: the finetune sections (``model`` = the student) plus teacher and switches."""

from __future__ import annotations

from pydantic import Field, model_validator

from pipelines.config import StrictConfig
from pipelines.finetune.config import FinetuneConfig


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
    init_from_teacher: bool = Field(
        False, description="start the student from evenly spaced teacher blocks (same width, fewer blocks) "
                           "instead of random or model.pretrained weights")
    projection_seed: int = 0


class DistillConfig(FinetuneConfig):
    """The finetune sections (``model`` = the student) plus teacher, switches and output."""

    out: str = Field(..., description="output directory: Train runs (checkpoint.storage_path) and the teacher copy")
    teacher: str = Field("models:/vitpose@champion", description="models:/..., runs:/... or a checkpoint path")
    student: StudentArch = StudentArch()
    distill: DistillSection = DistillSection()
    teacher_checkpoint: str | None = Field(None, description="set by run_distill: the teacher where workers read it")
    token_checkpoint: str | None = Field(None, description="set by run_distill: stage 1's exported token")

    @model_validator(mode="after")
    def _token_stage_warmup(self) -> DistillConfig:
        # stage 1 runs with the student's schedule.warmup_steps (token_stage_config) but its own step budget
        token_steps = self.distill.token_max_steps
        if self.distill.knowledge_token and token_steps is not None and self.schedule.warmup_steps > token_steps:
            raise ValueError(f"schedule.warmup_steps ({self.schedule.warmup_steps}) is larger than "
                             f"distill.token_max_steps ({token_steps}); the token stage uses the same warm-up, "
                             f"so set warmup_steps <= {token_steps} or raise token_max_steps")
        return self
