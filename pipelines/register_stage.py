"""The pipeline's `register` stage: the one place that decides the champion.

Inside `vitpose run`, tune and distill do *not* register anything (the adapters switch their own
`registry` off); they only leave a checkpoint and a val AP in their stage records. This stage then:

1. scores every candidate checkpoint (finetune's best, tune's winner, distill's student) *and* the
   current `<model_name>@<alias>` holder, if there is one, with the same code on the same val set:
   the finetune stage's `validate` (flip test, COCO AP) over the shard stage's val split, each model
   at its own input resolution (`pipelines.champion.val_ap_scorer`);
2. logs + registers the best candidate as a new version of `model_name`;
3. moves `alias` to it only if it beats the current holder, so a worse run never demotes a
   champion from an earlier pipeline run in the same MLflow store.

Rescoring instead of trusting the stages' own `val_AP` keeps the comparison fair when stages
evaluate differently (e.g. `eval.max_instances` caps, or a tune trial's best epoch).
"""

from __future__ import annotations

import logging
import tempfile
from typing import Any

from pipelines.config import StrictConfig, build_config
from pipelines.pipeline import StageContext, StageOutput

logger = logging.getLogger(__name__)


class RegisterSection(StrictConfig):
    """Which stages compete, and the registry name + alias the winner gets."""

    model_name: str = "vitpose"
    alias: str = "champion"
    metric: str = "ap"  # the only metric the shared scorer computes; kept for the record and summary
    candidates: tuple[str, ...] = ("finetune", "tune", "distill")


def validate_register(section: dict[str, Any]) -> RegisterSection:
    config = build_config(RegisterSection, section, source="register section")
    if config.metric != "ap":
        from pipelines.config import ConfigError

        raise ConfigError(f"register.metric {config.metric!r}: candidates are rescored with COCO AP on the "
                          "shared val set, so the metric is `ap`")
    return config


def scoring_config(context: StageContext) -> Any:
    """The FinetuneConfig whose val set and eval settings score every model: the pipeline's finetune
    section with the shard stage's output (the model section is overridden per checkpoint)."""
    from pipelines.finetune import FinetuneConfig

    section = {key: dict(value) if isinstance(value, dict) else value
               for key, value in context.config.section("finetune").items()}
    shards = context.inputs["shard"]["outputs"]["shards"]
    section["data"] = {**section.get("data", {}), "shards": shards}
    section["model"] = {**section.get("model", {}), "pretrained": None}
    section["tracking"] = {"enabled": False}
    return build_config(FinetuneConfig, section, source="register scoring (finetune section)")


def local_checkpoint(uri: str) -> Any:
    """A local directory holding the checkpoint at `uri` (downloaded when it is on s3://)."""
    from pathlib import Path

    from pipelines import registry, storage
    from pipelines.train import download_dir

    if storage.is_s3(uri):
        return download_dir(uri, Path(tempfile.mkdtemp(prefix="vitpose-candidate-")))
    return registry.resolve_model_source(uri)


def run_register_stage(context: StageContext) -> StageOutput:
    from pipelines import registry
    from pipelines.champion import val_ap_scorer

    section: RegisterSection = context.section
    candidates = {name: record["outputs"]["checkpoint"] for name, record in context.inputs.items()
                  if name in section.candidates and (record.get("outputs") or {}).get("checkpoint")}
    if not candidates:
        raise RuntimeError(f"none of the candidate stages {list(section.candidates)} has a record with a checkpoint; "
                           "run at least one of them first (e.g. `vitpose run --stages shard,finetune,register`)")
    score = val_ap_scorer(scoring_config(context))
    scores = {}
    for name, checkpoint in candidates.items():
        scores[name] = score(local_checkpoint(checkpoint))
        logger.info("register: %s val AP %.4f (%s)", name, scores[name], checkpoint)
    winner = max(scores, key=lambda name: scores[name])

    tracking_uri = context.tracking_uri
    holder = registry.get_alias(section.model_name, section.alias, tracking_uri)
    holder_ap = None
    if holder is not None:
        with tempfile.TemporaryDirectory() as tmp:
            holder_ap = score(registry.resolve_model_source(f"models:/{section.model_name}/{holder}", tracking_uri, tmp))
    model_uri = registry.log_checkpoint_model(local_checkpoint(candidates[winner]), run_id=context.run_id,
                                              tracking_uri=tracking_uri,
                                              metadata={"stage": winner, "val_AP": scores[winner]})
    version = registry.register(model_uri, section.model_name, tracking_uri=tracking_uri)
    promoted = holder_ap is None or scores[winner] > holder_ap
    if promoted:
        registry.set_alias(section.model_name, section.alias, version, tracking_uri=tracking_uri)
    champion_version = version if promoted else holder
    champion_ap = scores[winner] if promoted else holder_ap
    _tag_version(section, version, winner, scores, holder, holder_ap, promoted, tracking_uri)

    metrics = {f"{name}_ap": value for name, value in scores.items()}
    metrics.update(ap=float(champion_ap), candidate_ap=scores[winner], promoted=float(promoted))
    verdict = (f"v{version} from {winner} is {section.alias}" if promoted else
               f"v{version} from {winner} (AP {scores[winner]:.3f}) did not beat v{holder}; {section.alias} stays")
    return StageOutput(
        outputs={"model_uri": f"models:/{section.model_name}@{section.alias}", "version": champion_version,
                 "candidate_version": version, "winner": winner, "promoted": promoted,
                 "checkpoint": candidates[winner], "scores": scores},
        metrics=metrics,
        summary=f"{verdict}, AP {champion_ap:.3f} ({', '.join(f'{n} {s:.3f}' for n, s in scores.items())})")


def _tag_version(section: RegisterSection, version: str, winner: str, scores: dict[str, float],
                 holder: str | None, holder_ap: float | None, promoted: bool, tracking_uri: str) -> None:
    """Keep the comparison on the model version itself, where the registry UI shows it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    tags = {"stage": winner, "val_AP": scores[winner], "promoted": promoted, "compared_with_version": holder,
            "compared_with_val_AP": holder_ap, **{f"{name}_val_AP": value for name, value in scores.items()}}
    for key, value in tags.items():
        client.set_model_version_tag(section.model_name, version, key, str(value))
