"""Small config sections the training stages compose (torchtitan style: each function takes only its section).

Every section is a frozen ``StrictConfig``: an unknown key anywhere is an error that names it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipelines.config import StrictConfig
from pipelines.data import StreamConfig
from vitpose_core.models import VARIANTS, ViTPoseConfig

# ModelSection does not expose the patch size, so every variant is built with ViTPoseConfig's default
# (16 px, with the official padded patch conv); read it from there rather than repeating the number
PATCH_SIZE: int = ViTPoseConfig.model_fields["patch_size"].default
MIN_INPUT_SIDE = 32  # ViTPoseConfig rejects smaller crops


class ModelSection(StrictConfig):
    variant: str = "vitpose-tiny"
    input_size: tuple[int, int] = Field((192, 256), description="model input (W, H); heatmaps are 1/4")
    drop_path_rate: float | None = Field(None, ge=0, lt=1, description="None: the variant's official rate")
    attention: Literal["full", "window", "shifted_window", "pooling_window"] = "full"
    window_size: int = Field(8, ge=1)
    grad_checkpointing: bool = False
    pretrained: str | None = Field(None, description="MAE encoder dir (pretrain output) or a ViTPose checkpoint")
    num_experts: int = Field(0, ge=0, description="multi-dataset runs: ViTPose++ MoE FFNs with this many experts "
                             "(>= the number of datasets); 0: plain FFNs")
    part_features: int | None = Field(None, ge=1, description="MoE: FFN output features of the dataset experts "
                                      "(None: embed_dim // 4, the official ViTPose++ split, 192 of 768 for B)")

    @field_validator("variant")
    @classmethod
    def _known_variant(cls, value: str) -> str:
        if value not in VARIANTS:
            raise ValueError(f"unknown variant {value!r}; known: {sorted(VARIANTS)}")
        return value

    @field_validator("input_size")
    @classmethod
    def _whole_patches(cls, value: tuple[int, int]) -> tuple[int, int]:
        # (side + 2*padding - patch) // patch + 1 tokens give side/4 heatmap pixels (the data stream's targets)
        # only when the side is a multiple of the patch; otherwise the loss fails on mismatched shapes at step 1
        if min(value) < MIN_INPUT_SIDE:
            raise ValueError(f"model.input_size {tuple(value)} is too small: each side (W, H) must be >= "
                             f"{MIN_INPUT_SIDE} px")
        if any(side % PATCH_SIZE for side in value):
            nearest = tuple(max(MIN_INPUT_SIDE, round(side / PATCH_SIZE) * PATCH_SIZE) for side in value)
            raise ValueError(f"model.input_size {tuple(value)} must be multiples of the patch size {PATCH_SIZE}, "
                             f"e.g. {nearest}")
        return value

    def overrides(self) -> dict[str, Any]:
        """Keyword overrides for ``build_model`` / ``variant_config``."""
        fields: dict[str, Any] = {"input_size": tuple(self.input_size), "attention": self.attention,
                                  "window_size": self.window_size, "grad_checkpointing": self.grad_checkpointing,
                                  "drop_path_rate": self.drop_path_rate if self.drop_path_rate is not None
                                  else VARIANTS[self.variant].drop_path_rate}
        if self.num_experts:
            fields["num_experts"] = self.num_experts
            fields["part_features"] = (self.part_features if self.part_features is not None
                                       else VARIANTS[self.variant].embed_dim // 4)
        return fields


class PreprocessSection(StrictConfig):
    """Where the training transform (decode, augment, heatmap targets) runs."""
    where: Literal["train_worker", "ray_data"] = Field(
        "train_worker", description="train_worker: in each Train worker, on one background thread (~500 crops/s "
        "per core at 256x192, bench/results/data_feeding.md); ray_data: Ray Data tasks on any node with `num_cpus` "
        "and `resources`, streamed into the workers: use it when one core per worker cannot feed its GPU")
    num_cpus: float = Field(1.0, gt=0, description="ray_data: CPUs per transform task")
    resources: dict[str, float] = Field(default_factory=dict, description="ray_data: custom resources per task, "
                                        "to place the transform on a node type (e.g. {cpu_node: 0.01})")
    max_tasks: int | None = Field(None, ge=1, description="ray_data: at most this many transform tasks at once; "
                                  "None: as many as the cluster's free CPUs allow")


class DataSection(StrictConfig):
    shards: str | None = Field(None, description="output of the shard stage (local path or s3://); the "
                               "`vitpose run` pipeline fills it in")
    val_annotations: str | None = Field(None, description="COCO json of the val split; None: from the manifest")
    batch_size: int = Field(64, ge=1, description="global batch, split evenly over the workers")
    shuffle_buffer: int = Field(1024, ge=1)
    prefetch_batches: int = Field(2, ge=0, description="batches prepared ahead on a background thread of each "
                                  "worker (decode, augment, encode overlap the step); 0: in the step's thread")
    stream: StreamConfig = StreamConfig()
    preprocess: PreprocessSection = PreprocessSection()

    @model_validator(mode="after")
    def _input_size_lives_in_model(self) -> DataSection:
        if "input_size" in self.stream.model_fields_set:
            raise ValueError("data.stream.input_size is set from model.input_size; remove it from data.stream")
        return self

    def stream_config(self, input_size: tuple[int, int]) -> StreamConfig:
        return self.stream.model_copy(update={"input_size": tuple(input_size)})


class OptimSection(StrictConfig):
    lr: float = Field(5e-4, gt=0, description="base lr of the head (official ViTPose: 5e-4 at batch 512)")
    weight_decay: float = Field(0.1, ge=0)
    layer_decay: float | None = Field(None, gt=0, le=1, description="None: the variant's official rate")
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = Field(1.0, gt=0)

    def layer_decay_for(self, config: Any) -> float:
        return self.layer_decay if self.layer_decay is not None else VARIANTS[config.model.variant].layer_decay


class ScheduleSection(StrictConfig):
    epochs: int = Field(210, ge=1)
    max_steps: int | None = Field(None, ge=1, description="cap on optimiser steps (short runs, benchmarks)")
    warmup_steps: int = Field(500, ge=0)
    warmup_ratio: float = Field(0.001, ge=0, le=1)
    kind: Literal["step", "cosine", "constant"] = "step"
    milestones: tuple[int, ...] = Field((170, 200), description="epochs where the step schedule multiplies by gamma")
    gamma: float = Field(0.1, gt=0, le=1)
    min_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of the lr")

    @model_validator(mode="after")
    def _warmup_fits_max_steps(self) -> ScheduleSection:
        # the total is min(epochs x steps per epoch, max_steps); the data-dependent part is checked when a
        # run starts (pipelines.training.recipe.check_schedule), this part needs no data
        if self.max_steps is not None and self.warmup_steps > self.max_steps:
            raise ValueError(f"schedule.warmup_steps ({self.warmup_steps}) is larger than schedule.max_steps "
                             f"({self.max_steps}), so the warm-up would never end; set warmup_steps <= max_steps")
        return self


class FSDPSection(StrictConfig):
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) options, read only when ``scaling.strategy`` is fsdp.

    Mixed precision is ``scaling.precision``'s (bf16: bf16 compute copies of the parameters, fp32 gradient
    reduction, fp32 sharded weights for the optimiser), not a key here.
    """

    reshard_after_forward: bool = Field(
        True, description="true: free each transformer block's gathered parameters after its forward and gather "
                          "them again for its backward (least memory); false: keep them until the backward "
                          "(one all-gather less per block, more memory)")
    cpu_offload: bool = Field(
        False, description="keep the sharded parameters, gradients and optimiser state in CPU memory and step the "
                           "optimiser on the CPU (GPU runs only: less GPU memory, host-device copies every step)")


class ScalingSection(StrictConfig):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0)
    torch_threads: int | None = Field(
        None, ge=1, description="intra-op threads of each worker's torch; None: Ray's default, the worker's CPUs "
                                "(at least 1). More than its CPUs uses cores Ray has left to other tasks")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: replicated model; fsdp: FSDP2, parameters, gradients and optimiser state sharded "
                           "per transformer block (ViTPose-H/G on GPUs; also runs on CPU over gloo)")
    fsdp: FSDPSection = FSDPSection()
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 where the device computes it natively (CUDA; CPUs with AVX512-BF16 or AMX), "
                            "else fp32 (emulated bf16 on an AVX2 CPU was 22x slower than fp32)")
    placement_strategy: Literal["PACK", "SPREAD"] = Field(
        "PACK", description="how the workers' bundles are placed: PACK fills a node first; SPREAD puts them on "
                            "different nodes where it can (soft: after a node is lost, the rest may share one)")
    node_resources: dict[str, float] = Field(
        {}, description="custom Ray resources each worker also reserves, to pin workers to a node type "
                        "(e.g. {gpu_node: 0.01} where ray_cluster.yaml gives GPU nodes `gpu_node: 1`)")
    wait_for_workers_s: float = Field(
        900, gt=0, description="how long, in all over the run, Ray may fail to place the worker group (at the "
                               "start, and after a node is lost) before the stage fails naming what is missing. "
                               "An autoscaler takes minutes to add a node; on a fixed-size cluster a shorter wait "
                               "fails sooner. Tune trials wait without limit (behind the trials ahead of them)")

    @model_validator(mode="after")
    def _cpu_offload_needs_gpus(self) -> ScalingSection:
        # scaling.fsdp is read only under strategy fsdp: a section that derives from an FSDP one and switches
        # to ddp (distill's student in vitpose_h_fsdp.yaml) inherits its options without using them
        if self.strategy == "fsdp" and self.fsdp.cpu_offload and not self.use_gpu:
            raise ValueError("scaling.fsdp.cpu_offload needs scaling.use_gpu=true: without GPUs the parameters "
                             "already live in CPU memory")
        return self


class CheckpointSection(StrictConfig):
    storage_path: str = Field("runs", description="Ray Train storage: a local directory or s3://bucket/prefix")
    name: str | None = Field(None, description="run name; None: <stage>-<config hash> (same config -> resume)")
    every_n_steps: int = Field(200, ge=1)
    num_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the last checkpoint")
