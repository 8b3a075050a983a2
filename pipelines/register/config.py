"""The register stage's config: which candidates compete on which val set, and the name + alias the winner gets."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipelines.config import StrictConfig
from pipelines.finetune.config import FinetuneConfig


class RegisterConfig(StrictConfig):
    model_name: str = "vitpose"
    alias: str = "champion"
    metric: Literal["ap"] = Field("ap", description="COCO AP, rescored for every candidate on the same val set")
    candidates: tuple[str, ...] = Field(("finetune", "tune", "distill"),
                                        description="stages whose checkpoints compete (in a pipeline file)")
    checkpoints: dict[str, str] = Field({}, description="candidate name -> checkpoint URI; `vitpose run` fills "
                                        "it from the candidate stages' records")
    scoring: FinetuneConfig = Field(FinetuneConfig(), description="val set (data.shards) and eval settings that "
                                    "score every candidate and the current champion; the model section is ignored "
                                    "(each model is scored at its own input size)")
    tracking_uri: str | None = Field(None, description="None: MLFLOW_TRACKING_URI, else the pipeline's store")
    out: str | None = Field(None, description="where the champion's pictures go (local or s3://); they are "
                            "logged to the stage's MLflow run either way")
    curves: dict[str, str] = Field({}, description="label -> MLflow run id whose val AP and loss are plotted "
                                   "(`vitpose run`: the candidates' training runs)")
    detections: str | None = Field(None, description="COCO detection results on the val images (the detect stage's "
                                   "`val_detections`); when set, the champion's pose AP over the val images is "
                                   "reported with these boxes and with ground-truth boxes")
