"""Knowledge-token distillation (ViTPose, Xu et al., 2022, Sec. 3.4, https://arxiv.org/abs/2204.12484).

Two ways a large teacher T helps a small student S, each switchable on its own:

1. **Knowledge token** (paper eq. 3 and 4). Stage 1 learns one token t with the teacher *frozen*:
   ``t* = argmin_t MSE(T({t; X}), K_gt)``; the token is appended after the teacher's patch tokens and
   takes part in every block's attention. Stage 2 freezes t* and appends it to the student's patch
   tokens while the student trains on the same ground-truth loss: ``L_td = MSE(S({t*; X}), K_gt)``.
2. **Output distillation** (eq. 2): ``L_od = MSE(S(X), T(X))``, added with weight ``output_weight``.

Stage 1 is plain heatmap fine-tuning of a ``TokenTeacher`` (the engine's ``FinetuneTask``); stage 2
trains a ``TokenStudent`` (or a bare student when the token is off) with ``DistillTask``. Both run on
the shared engine (``vitpose_core.engine``); nothing here knows about Ray or MLflow.

Width matching. The paper distils between equal widths only. When the teacher is wider than the
student (ViTPose-B 768 -> ViTPose-S 384), the token (C_t,) reaches the student through a *fixed*
projection P (C_s, C_t): rows orthonormal, drawn from a seeded Gaussian, scaled by sqrt(C_t / C_s)
so the token keeps its norm on average, and stored as a buffer in checkpoints. P is deliberately not
learned: a learned linear map (with or without bias) of one fixed vector can produce *any* student
vector, which would turn t* into an ordinary learnable student token and discard what the teacher put
into it. With equal widths P is the identity.

Inference. The student is deployed as a plain ``ViTPose`` (no token): the token is a training-time
device, so a distilled student has exactly the serving cost and checkpoint format of any other model.
``student_with_token`` keeps the token at evaluation for comparison (the bench reports both).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vitpose_core.codec import keypoint_mse_loss
from vitpose_core.engine import Batch
from vitpose_core.models.vitpose import ViTPose


def require_full_attention(model: ViTPose, role: str) -> None:
    """Extra tokens attend only under full attention (``models.attention``); fail early and clearly."""
    config = model.config
    if config.attention != "full" and len(config.full_attention_blocks) != config.depth:
        raise ValueError(f"the knowledge token needs a {role} with full attention, but it uses "
                         f"{config.attention!r}; distil from/into a full-attention model or switch the token off")


def freeze(model: nn.Module) -> nn.Module:
    """No gradients and eval mode (no drop path) for a model that only provides targets."""
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


class KnowledgeToken(nn.Module):
    """``num_tokens`` learnable tokens of the teacher's width, expanded over the batch: (B, E, C_t)."""

    def __init__(self, width: int, num_tokens: int = 1) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.zeros(1, num_tokens, width))
        nn.init.trunc_normal_(self.tokens, std=0.02)  # the scale of the ViT's own embeddings

    @property
    def width(self) -> int:
        return self.tokens.shape[-1]

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.tokens.expand(batch_size, -1, -1)  # (1, E, C) -> (B, E, C)


def fixed_projection(in_width: int, out_width: int, seed: int = 0) -> torch.Tensor:
    """(out_width, in_width) matrix with orthonormal rows (or columns), norm-preserving on average.

    Identity when the widths match. Seeded, so stage 2 and a later reload rebuild the same map.
    """
    if in_width == out_width:
        return torch.eye(out_width)
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(max(in_width, out_width), min(in_width, out_width), generator=generator)
    basis, _ = torch.linalg.qr(gaussian)  # (max, min) with orthonormal columns
    if out_width > in_width:
        return basis  # (out, in) with orthonormal columns: an isometry, norms kept exactly
    # (out, in) with orthonormal rows keeps out/in of the squared norm on average: scale it back
    return basis.T * (in_width / out_width) ** 0.5


class TokenTeacher(nn.Module):
    """Stage 1: frozen teacher + learnable knowledge token; only the token receives gradients."""

    def __init__(self, teacher: ViTPose, num_tokens: int = 1) -> None:
        super().__init__()
        require_full_attention(teacher, "teacher")
        self.teacher = freeze(teacher)
        self.knowledge_token = KnowledgeToken(teacher.config.embed_dim, num_tokens)

    def train(self, mode: bool = True) -> TokenTeacher:
        super().train(mode)
        self.teacher.eval()  # the engine calls model.train(); the frozen teacher must stay deterministic
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher(images, extra_tokens=self.knowledge_token(images.shape[0]))


class TokenStudent(nn.Module):
    """Stage 2: a trainable student whose patch tokens are joined by the frozen, projected token t*.

    Args:
        student: the model being trained (its weights are the only trainable parameters).
        tokens: t* from stage 1, (1, E, C_t) or (E, C_t); copied and frozen.
        seed: seed of the fixed width projection (module docstring), used when C_t != C_s.
    """

    def __init__(self, student: ViTPose, tokens: torch.Tensor, seed: int = 0) -> None:
        super().__init__()
        require_full_attention(student, "student")
        self.student = student
        tokens = tokens.detach().reshape(1, -1, tokens.shape[-1]).float()
        projection = fixed_projection(tokens.shape[-1], student.config.embed_dim, seed)
        # buffers: saved and moved with the module, never optimised
        self.register_buffer("tokens", tokens @ projection.T)  # (1, E, C_t) -> (1, E, C_s)

    @property
    def config(self):  # so checkpoint helpers and evaluators see the student's ViTPoseConfig
        return self.student.config

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images, extra_tokens=self.tokens.expand(images.shape[0], -1, -1))


@dataclass(frozen=True)
class DistillTask:
    """Stage-2 loss: ground-truth heatmap loss (with or without the token, decided by the model the
    engine passes in) plus ``output_weight`` x MSE to the frozen teacher's heatmaps.

    Attributes:
        teacher: the frozen teacher (plain, no token), needed only when ``output_weight > 0``.
        output_weight: weight of output distillation; 0 switches it off (and the teacher is not run).
        gt_weight: weight of the ground-truth loss (1 in the paper).
    """

    teacher: nn.Module | None = None
    output_weight: float = 0.0
    gt_weight: float = 1.0
    name: str = "distill"

    def __post_init__(self) -> None:
        if self.output_weight < 0 or self.gt_weight < 0:
            raise ValueError("distillation weights must be >= 0")
        if self.output_weight > 0 and self.teacher is None:
            raise ValueError("output distillation (output_weight > 0) needs a teacher")

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        heatmaps = model(batch["image"])
        gt_loss = keypoint_mse_loss(heatmaps, batch["target"], batch.get("target_weight"))
        loss = self.gt_weight * gt_loss
        metrics = {"heatmap_loss": gt_loss.detach()}
        if self.output_weight > 0:
            with torch.no_grad():
                self.teacher.eval()
                teacher_heatmaps = self.teacher(batch["image"])
            # unweighted: the teacher's maps for unlabelled joints are exactly the extra signal wanted
            output_loss = keypoint_mse_loss(heatmaps, teacher_heatmaps)
            loss = loss + self.output_weight * output_loss
            metrics["output_distill_loss"] = output_loss.detach()
        return loss, metrics


def teacher_block_indices(teacher_depth: int, student_depth: int) -> list[int]:
    """Evenly spaced teacher blocks for a shallower student, first and last included (6 -> 3: 0, 2, 5)."""
    if not 1 <= student_depth <= teacher_depth:
        raise ValueError(f"a student initialised from its teacher needs 1 <= depth <= the teacher's "
                         f"({teacher_depth}); got {student_depth}")
    if student_depth == 1:
        return [teacher_depth - 1]
    return [round(i * (teacher_depth - 1) / (student_depth - 1)) for i in range(student_depth)]


def init_student_from_teacher(student: ViTPose, teacher: ViTPose) -> list[str]:
    """Copy the teacher's weights into a shallower student of the same width: patch embedding, position
    embedding, evenly spaced blocks (``teacher_block_indices``), the final norm and, where its shapes
    match, the decoder. Returns the student's parameter names that were copied.

    Not in the paper (its students start from MAE weights); layer selection from the teacher is how
    DistilBERT starts its student, and here it is what lets a half-depth student keep most of the teacher's
    AP in a short distillation budget (bench/results/distill.md). Widths must match: a narrower student
    has nothing to take, and the error says so.
    """
    if student.config.embed_dim != teacher.config.embed_dim:
        raise ValueError(f"init from teacher needs the student's width to be the teacher's: student embed_dim "
                         f"{student.config.embed_dim}, teacher {teacher.config.embed_dim}")
    teacher_state = teacher.state_dict()
    blocks = teacher_block_indices(len(teacher.backbone.blocks), len(student.backbone.blocks))
    copied = []
    new_state = {}
    for name, value in student.state_dict().items():
        source = name
        if name.startswith("backbone.blocks."):
            index, rest = name[len("backbone.blocks."):].split(".", 1)
            source = f"backbone.blocks.{blocks[int(index)]}.{rest}"
        if source in teacher_state and teacher_state[source].shape == value.shape:
            new_state[name] = teacher_state[source].clone()
            copied.append(name)
    student.load_state_dict(new_state, strict=False)
    return copied


def student_for_training(student: ViTPose, tokens: torch.Tensor | None, seed: int = 0) -> nn.Module:
    """The module stage 2 optimises: ``TokenStudent`` when a token is given, else the bare student."""
    return student if tokens is None else TokenStudent(student, tokens, seed)


def deployable_student(model: nn.Module) -> ViTPose:
    """The plain ViTPose inside a stage-2 model (what is saved, registered and served)."""
    return model.student if isinstance(model, TokenStudent) else model


__all__ = [
    "DistillTask", "KnowledgeToken", "TokenStudent", "TokenTeacher", "deployable_student", "fixed_projection",
    "freeze", "init_student_from_teacher", "require_full_attention", "student_for_training", "teacher_block_indices",
]
