"""Typed config of the serve stage: model source, batching, autoscaling, backpressure and input limits.

One `ServeConfig` drives everything: `vitpose serve --config pipelines/configs/serve.yaml`, the
application builder (`build_app(args)` validates its `args` dict into this class, so a Serve config
YAML or a KubeRay RayService carries the same keys under `args:`), the tests and the benchmark.
Unknown keys are errors (StrictConfig).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pipelines.config import StrictConfig


class ModelSourceConfig(StrictConfig):
    """Where the served model comes from; the first of `checkpoint`, `run_id`, `version`, alias that is set wins.

    - `checkpoint`: a local path (or path on every node) to an own-format checkpoint directory or an
      official ViTPose `.pth`;
    - `run_id`: an MLflow run that logged the checkpoint with `pipelines.registry.log_checkpoint_model`
      under `artifact_path`;
    - `version`: registered model `registered_model`, this version (pins it: a rollback);
    - otherwise the registered model `registered_model` at alias `alias` (default `champion`). Model
      replicas poll the alias every `watch_interval_s` seconds and swap in the version it points at
      (zero-downtime promotion, docs/serving.md); 0 turns the watch off.

    This section is also the model deployment's Serve `user_config`: `serve deploy` with a changed
    `user_config` makes running replicas load the new source in place (`PoseModel.reconfigure`).
    """

    checkpoint: str | None = None
    run_id: str | None = None
    artifact_path: str = "model"
    registered_model: str = "vitpose"
    version: str | None = Field(None, pattern=r"^[1-9][0-9]{0,9}$")
    alias: str = "champion"
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI from the replica's environment
    watch_interval_s: float = Field(30.0, ge=0, le=86400)

    @property
    def uri(self) -> str:
        """The source as one URI that `pipelines.registry.resolve_model` understands."""
        if self.checkpoint:
            return self.checkpoint
        if self.run_id:
            return f"runs:/{self.run_id}/{self.artifact_path}"
        if self.version:
            return f"models:/{self.registered_model}/{self.version}"
        return f"models:/{self.registered_model}@{self.alias}"

    @property
    def watches_alias(self) -> bool:
        """True when the source is a registry alias that replicas poll for promotions."""
        return not (self.checkpoint or self.run_id or self.version) and self.watch_interval_s > 0


class BatchingConfig(StrictConfig):
    """`@serve.batch` over person crops: up to `max_batch_size` crops from any requests per forward pass."""

    max_batch_size: int = Field(16, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, le=10.0)


class AutoscalingConfig(StrictConfig):
    """Replica autoscaling of the model deployment (Serve's `autoscaling_config`)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = None
    target_ongoing_requests: float = Field(4.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    # how far back Serve averages the ongoing requests it scales on
    look_back_period_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _check_range(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class LimitsConfig(StrictConfig):
    """Per-request input limits checked in the ingress before any decoding work."""

    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(4096 * 4096, ge=64)  # checked from the image header, before decoding
    max_side: int = Field(16384, ge=16, le=32000)  # OpenCV's warps need sides < 32767
    max_boxes: int = Field(32, ge=1)
    min_box_side: float = Field(1.0, gt=0)  # pixels; thinner boxes give a degenerate crop


class ResourcesConfig(StrictConfig):
    """CPUs/GPUs per replica and torch threads of the model replica (0 = leave torch's default)."""

    model_num_cpus: float = Field(1.0, ge=0)
    model_num_gpus: float = Field(0.0, ge=0)
    ingress_num_cpus: float = Field(0.25, ge=0)
    ingress_replicas: int = Field(1, ge=1)
    torch_threads: int = Field(0, ge=0)
    # custom Ray resources each model replica needs, e.g. {"pose_worker": 1} to keep replicas on the
    # node type that declares it (`ray start --resources`, a KubeRay worker group's rayStartParams)
    model_resources: dict[str, float] = {}


class DetectorConfig(StrictConfig):
    """An optional person-detector deployment for requests without boxes (see `pipelines.serve.detector`).

    `import_path` names a class `module:Class` implementing `PersonDetector`; None means every
    box-free request is one whole-image box.
    """

    import_path: str | None = None
    init_kwargs: dict[str, Any] = {}
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0.0, ge=0)


class ServeConfig(StrictConfig):
    """Everything `vitpose serve` and `build_app` need; see docs/serving.md for each field."""

    model: ModelSourceConfig = ModelSourceConfig()
    batching: BatchingConfig = BatchingConfig()
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    resources: ResourcesConfig = ResourcesConfig()
    limits: LimitsConfig = LimitsConfig()
    detector: DetectorConfig = DetectorConfig()
    # backpressure: requests beyond max_ongoing + max_queued per caller get 503 + Retry-After at once
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(64, ge=0)
    retry_after_s: int = Field(1, ge=0)
    request_timeout_s: float = Field(30.0, gt=0)
    flip_test: bool = False
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    # torch.compile with inductor freezing (vitpose_core.inference.optimize_for_inference): ViTPose-B
    # bf16 ran 1.2x faster than uncompiled here, but each replica spends ~1 minute (2 cores)
    # compiling before it reports ready, which slows scale-up; worth it for long-lived replicas.
    compile: bool = False
    app_name: str = "vitpose"
    route_prefix: str = "/"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    find_free_port: bool = Field(False, description="when `port` is taken (another Serve on the machine), use a "
                                 "free one instead of failing (the embedded pipeline turns it on)")
    startup_timeout_s: float = Field(180.0, gt=0, description="how long `vitpose run` waits for /healthz")
