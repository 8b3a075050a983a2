"""What one `vitpose infer` run does: inputs, model, person boxes, outputs, actors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ModelRef:
    """A model (pose model or person detector) as the actors load it and as part keys name it.

    `uri` is what `pipelines.registry.resolve_model` resolves on each actor: a checkpoint path (local, on
    every node, or s3://) or a registry URI pinned to a version (`models:/vitpose/3`, never an alias, so
    every actor loads the same weights). `identity` is what part keys hash: the registry name and version,
    or the SHA-256 of the checkpoint's files.
    """

    uri: str
    identity: str
    label: str  # how outputs name it: "vitpose v3", or the checkpoint path
    tracking_uri: str | None = None


@dataclass(frozen=True)
class InferConfig:
    """A `vitpose infer` run.

    `batch_size` is images per actor call, which is also a part (the unit written, skipped and resumed);
    crops of a part go through the model `crops_per_forward` at a time.
    """

    input: str  # a local folder, an s3:// prefix, or a local video file
    out: str  # a local folder or an s3:// prefix
    model: ModelRef
    boxes: str | None = None  # a COCO detection-results json
    box_score_threshold: float = 0.0
    detector: ModelRef | None = None
    detector_score_threshold: float | None = None  # None: the detector's saved threshold
    render: bool = False
    draw_score_threshold: float = 0.3
    actors: int = 1
    batch_size: int = 16
    crops_per_forward: int = 32
    device: Literal["cpu", "cuda"] = "cpu"
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 1.0  # with device cuda
    torch_threads: int = 1  # per actor; 1 is the fast choice on small shared CPUs (docs/serving.md)
    flip_test: bool = False
    dtype: Literal["fp32", "bf16", "auto"] = "fp32"  # auto: vitpose_core.inference.resolve_precision per actor
    oks_nms: bool = True
    max_frames: int | None = None  # video: at most this many frames
    frame_stride: int = 1  # video: every n-th frame

    def __post_init__(self) -> None:
        checks = {"--actors": self.actors >= 1, "--batch-size": self.batch_size >= 1,
                  "--frame-stride": self.frame_stride >= 1,
                  "--max-frames": self.max_frames is None or self.max_frames >= 1,
                  "--cpus-per-actor": self.cpus_per_actor > 0, "--torch-threads": self.torch_threads >= 0}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"vitpose infer: {', '.join(bad)} out of range (counts must be >= 1)")
        if self.boxes is not None and self.detector is not None:
            raise ValueError("give person boxes (--boxes) or a detector (--detector / --detector-alias), not both")

    def pose_settings(self) -> dict[str, object]:
        """What changes keypoints besides the model and the boxes: part keys hash it."""
        return {"flip_test": self.flip_test, "dtype": self.dtype, "device": self.device}
