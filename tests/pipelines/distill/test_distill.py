"""Knowledge-token distillation core: the token learns against a frozen teacher, the student trains with
the frozen token, width projection, and each switch (token, output distillation) on its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_synthetic_shards
from square_batches import square_batch

from vitpose_core.distill import (
    DistillTask,
    TokenStudent,
    TokenTeacher,
    deployable_student,
    fixed_projection,
    init_student_from_teacher,
    student_for_training,
    teacher_block_indices,
)
from vitpose_core.engine import EngineConfig, FinetuneTask, eval_step, train_step
from vitpose_core.models import build_model
from vitpose_core.optim import build_adamw

IMG = (64, 48)  # (H, W)
FP32 = EngineConfig(precision="fp32", max_grad_norm=1.0)


def make_batch(batch_size: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Bright squares at keypoint 0 with its UDP Gaussian target (learnable in a few steps)."""
    return square_batch(batch_size, IMG, np.random.default_rng(seed))


def tiny(width: int = 192, depth: int = 2, **overrides):
    return build_model("vitpose-tiny", img_size=IMG, embed_dim=width, depth=depth, num_heads=3,
                       mlp_hidden_dim=2 * width, decoder_channels=32, **overrides)


def test_token_trains_against_ground_truth_while_the_teacher_stays_frozen():
    torch.manual_seed(0)
    teacher = tiny(192)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    model = TokenTeacher(teacher)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["knowledge_token.tokens"]
    optimizer = build_adamw(model, lr=1e-2, weight_decay=0.0)
    batch = make_batch()
    token_before = model.knowledge_token.tokens.detach().clone()
    loss_before = eval_step(model, FinetuneTask(), batch, FP32)["loss"]
    for step in range(15):
        train_step(model, FinetuneTask(), batch, optimizer, None, FP32, step)
    assert not model.teacher.training  # engine's model.train() must not re-enable drop path in the teacher
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    assert not torch.equal(model.knowledge_token.tokens, token_before)
    assert eval_step(model, FinetuneTask(), batch, FP32)["loss"] < loss_before


def test_token_changes_the_teacher_output_only_through_attention():
    torch.manual_seed(0)
    model = TokenTeacher(tiny(192))
    images = make_batch()["image"]
    with_token = model(images)
    without = model.teacher(images)
    assert with_token.shape == without.shape == (4, 17, 16, 12)
    assert not torch.allclose(with_token, without)


@pytest.mark.parametrize("teacher_width,student_width", [(192, 192), (192, 96), (96, 192)])
def test_fixed_projection_is_identity_or_norm_preserving(teacher_width, student_width):
    projection = fixed_projection(teacher_width, student_width, seed=3)
    assert projection.shape == (student_width, teacher_width)
    assert torch.equal(projection, fixed_projection(teacher_width, student_width, seed=3))  # reproducible
    if teacher_width == student_width:
        assert torch.equal(projection, torch.eye(student_width))
    token = torch.randn(2000, teacher_width)
    ratio = (token @ projection.T).norm(dim=1).pow(2).mean() / token.norm(dim=1).pow(2).mean()
    assert ratio.item() == pytest.approx(1.0, rel=0.1)


def test_student_trains_with_the_frozen_projected_token():
    torch.manual_seed(0)
    tokens = torch.randn(1, 1, 192)
    model = student_for_training(tiny(96), tokens)
    assert isinstance(model, TokenStudent) and model.tokens.shape == (1, 1, 96)
    assert "tokens" in dict(model.named_buffers()) and "tokens" not in dict(model.named_parameters())
    # the optimiser sees exactly the plain student's parameters (layer decay names unchanged)
    optimizer = build_adamw(deployable_student(model), lr=1e-3)
    batch = make_batch()
    frozen = model.tokens.clone()
    loss_before = eval_step(model, DistillTask(), batch, FP32)["loss"]
    for step in range(10):
        train_step(model, DistillTask(), batch, optimizer, None, FP32, step)
    assert torch.equal(model.tokens, frozen)
    assert eval_step(model, DistillTask(), batch, FP32)["loss"] < loss_before
    # the deployable student is a plain ViTPose that runs without the token
    assert deployable_student(model)(batch["image"]).shape == (4, 17, 16, 12)


def test_switches_token_off_and_output_distillation_on_and_off():
    torch.manual_seed(0)
    teacher, student = tiny(192).eval(), tiny(96)
    assert student_for_training(student, None) is student  # token off: the bare student
    batch = make_batch()
    gt_only, metrics = DistillTask().loss(student, batch)
    assert set(metrics) == {"heatmap_loss"}
    combined, metrics = DistillTask(teacher=teacher, output_weight=0.5).loss(student, batch)
    assert set(metrics) == {"heatmap_loss", "output_distill_loss"}
    expected = metrics["heatmap_loss"] + 0.5 * metrics["output_distill_loss"]
    assert combined.item() == pytest.approx(expected.item(), rel=1e-5)
    assert combined.item() > gt_only.item() - 1e-7  # same gt term plus a non-negative one
    with pytest.raises(ValueError, match="needs a teacher"):
        DistillTask(output_weight=1.0)


def test_output_distillation_pulls_student_heatmaps_towards_the_teacher():
    torch.manual_seed(0)
    teacher, student = tiny(192).eval(), tiny(96)
    task = DistillTask(teacher=teacher, output_weight=1.0, gt_weight=0.0)
    optimizer = build_adamw(student, lr=1e-3)
    batch = make_batch()
    before = task.loss(student, batch)[1]["output_distill_loss"].item()
    for step in range(10):
        train_step(student, task, batch, optimizer, None, FP32, step)
    assert task.loss(student, batch)[1]["output_distill_loss"].item() < before


def test_student_from_teacher_blocks_starts_where_the_teacher_is():
    """A half-depth student of the teacher's width takes evenly spaced teacher blocks (first and last kept),
    the embeddings, the final norm and the decoder; a narrower student is refused with both widths named."""
    assert teacher_block_indices(6, 3) == [0, 2, 5] and teacher_block_indices(12, 12) == list(range(12))
    torch.manual_seed(0)
    teacher = build_model("vitpose-tiny", img_size=IMG, depth=4)
    student = build_model("vitpose-tiny", img_size=IMG, depth=2)
    copied = init_student_from_teacher(student, teacher)
    assert set(copied) == set(student.state_dict())  # same width: every tensor has a teacher source
    assert torch.equal(student.backbone.blocks[1].mlp.fc1.weight, teacher.backbone.blocks[3].mlp.fc1.weight)
    assert torch.equal(student.keypoint_head.final_layer.weight, teacher.keypoint_head.final_layer.weight)
    # the copied student is closer to the teacher's output than a random one of the same shape
    images = torch.randn(2, 3, *IMG)
    with torch.no_grad():
        target = teacher.eval()(images)
        fresh = build_model("vitpose-tiny", img_size=IMG, depth=2).eval()
        assert (student.eval()(images) - target).abs().mean() < (fresh(images) - target).abs().mean()
    with pytest.raises(ValueError, match="embed_dim 96, teacher 192"):
        init_student_from_teacher(build_model("vitpose-tiny", img_size=IMG, embed_dim=96, num_heads=3), teacher)


def test_token_needs_full_attention():
    with pytest.raises(ValueError, match="full attention"):
        TokenTeacher(tiny(192, attention="window", window_size=2))
    with pytest.raises(ValueError, match="full attention"):
        TokenStudent(tiny(96, attention="pooling_window", window_size=2), torch.zeros(1, 1, 192))


# ------------------------------------------------------------------ the distill stage on Ray Train + MLflow


@pytest.fixture(scope="module")
def distill_shards(ray_local, tmp_path_factory) -> str:
    return make_synthetic_shards(tmp_path_factory.mktemp("distill_data"), 12, 4, (72, 96))


def test_distill_stage_uses_the_champion_teacher_and_leaves_registration_to_register(distill_shards, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines import registry
    from pipelines.config import build_config
    from pipelines.distill.config import DistillConfig
    from pipelines.distill.run import run_distill
    from vitpose_core.checkpoint import load_model, save_checkpoint

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = mlflow.create_experiment("vitpose", artifact_location=str(tmp_path / "artifacts"))
    torch.manual_seed(0)
    teacher_dir = save_checkpoint(build_model("vitpose-tiny", img_size=(64, 48), depth=2), tmp_path / "teacher")
    with mlflow.start_run(experiment_id=experiment_id):
        version = registry.register(registry.log_checkpoint_model(teacher_dir, tracking_uri=tracking_uri), "vitpose",
                                    tracking_uri)
    registry.set_alias("vitpose", "champion", version, tracking_uri)

    config = build_config(DistillConfig, {
        "out": str(tmp_path / "distill"),  # teacher: the default models:/vitpose@champion
        "student": {"embed_dim": 96, "depth": 2, "num_heads": 3, "mlp_hidden_dim": 192},
        "data": {"shards": distill_shards, "batch_size": 8, "shuffle_buffer": 32},
        "schedule": {"epochs": 1, "warmup_steps": 1, "kind": "constant"},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.25},
        "eval": {"batch_size": 16, "num_visualized": 0},
        "distill": {"knowledge_token": True, "token_epochs": 1, "output_weight": 0.5},
        "tracking": {"tracking_uri": tracking_uri, "experiment": "vitpose", "log_every_n_steps": 1},
    })
    output = run_distill(config)
    record = output.outputs

    assert record["teacher_version"] == version and record["teacher_name"] == "vitpose"
    student = load_model(record["checkpoint"])  # the deployable student: a plain ViTPose, no token
    assert student.config.embed_dim == 96 and student.config.img_size == (64, 48)  # the teacher's resolution
    tokens = load_file_tokens(record["token_checkpoint"])
    assert tokens.shape == (1, 1, 192)
    assert 0.0 <= output.metrics["ap"] <= 1.0
    # the student is a candidate of the register stage: distill registered nothing (the teacher is the only model)
    assert [m.name for m in MlflowClient(tracking_uri).search_registered_models()] == ["vitpose"]
    run = MlflowClient(tracking_uri).get_run(record["mlflow_run_id"])
    assert "train_output_distill_loss" in run.data.metrics and "val_AP" in run.data.metrics


def load_file_tokens(token_dir: str) -> torch.Tensor:
    from pathlib import Path

    from safetensors.torch import load_file

    return load_file(str(Path(token_dir) / "token.safetensors"))["tokens"]
