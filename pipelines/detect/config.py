"""The detect stage's config: which images train the person detector, how, and the name it is registered under."""

from __future__ import annotations

from pydantic import Field

from pipelines.config import StrictConfig
from vitpose_core.detection import DetectorConfig, DetectorTrainConfig


class DetectDataSection(StrictConfig):
    """The shard stage's source images: train to learn, val to score (box AP, and pose AP in register)."""

    shards: str | None = Field(None, description="the shard stage's output; its manifest names the annotation "
                               "files and image folders (`vitpose run` fills it in)")
    datasets: tuple[str, ...] = Field((), description="only these datasets' sources (empty: all of the split)")
    max_train_images: int | None = Field(None, ge=1, description="the first N train images (None: all); the "
                                         "trainer holds every training image in memory, decoded")
    max_val_images: int | None = Field(None, ge=1, description="the first N val images (None: all)")


class DetectResources(StrictConfig):
    """What the Ray task that trains and scores the detector reserves."""

    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    torch_threads: int = Field(1, ge=0, description="intra-op threads in the task (0: torch's default); one is "
                                "the fast choice on 2 shared cores (bench/results/detector.md)")


class DetectConfig(StrictConfig):
    data: DetectDataSection = DetectDataSection()
    detector: DetectorConfig = Field(DetectorConfig(), description="architecture, input size and post-processing "
                                     "(vitpose_core.detection.DetectorConfig); score_threshold is what serving keeps")
    train: DetectorTrainConfig = DetectorTrainConfig()
    weights: str | None = Field(None, description="a torchvision weights file (local or s3://) to start from: a COCO "
                                "detector of the same architecture or ImageNet MobileNetV3 backbone weights; None: "
                                "random init. Nothing is downloaded")
    eval_score_threshold: float = Field(0.05, ge=0.0, le=1.0, description="detections kept for box AP and for pose "
                                        "AP with detected boxes (low: the pose rescoring weighs each box by its score)")
    resources: DetectResources = DetectResources()
    model_name: str = Field("vitpose-detector", description="registered model name (`vitpose run`: "
                            "<register.model_name>-detector)")
    alias: str = Field("champion", description="moves to the new version unless the holder scores a higher box AP")
    out: str | None = Field(None, description="where the detector and the val detections go (local or s3://)")
    tracking_uri: str | None = Field(None, description="None: MLFLOW_TRACKING_URI, else ./vitpose_runs/mlflow.db")
    experiment: str = "vitpose"
