"""`vitpose run` orchestration on a real local Ray and a real MLflow SQLite store (no mocks).

The default run covers the shard stage end to end (synthetic data -> Parquet shards -> stage record ->
MLflow parent/child runs) and the skip-on-rerun rule; every shipped pipeline config is loaded strictly.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipelines.config import ConfigError
from pipelines.pipeline import load_pipeline_config, read_record, run_pipeline, select_stages
from pipelines.progress import Reporter
from pipelines.stages import STAGES

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "pipelines" / "configs"
PIPELINE_CONFIGS = [CONFIGS_DIR / name for name in ("local.yaml", "cocoaic_vitpose_b_8gpu.yaml", "vitpose_h_fsdp.yaml")]
TINY = ["shard.synthetic.train_images=8", "shard.synthetic.val_images=3", "shard.synthetic.max_people=2"]


@pytest.mark.parametrize("path", PIPELINE_CONFIGS, ids=lambda p: p.name)
def test_shipped_pipeline_configs_load_strictly(path: Path) -> None:
    config = load_pipeline_config(path)
    assert config.workdir


def test_unknown_keys_are_errors_that_name_them() -> None:
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        load_pipeline_config(None, ["shard.bogus=1"])
    with pytest.raises(ConfigError, match="unknown key 'workdirr'"):
        load_pipeline_config(None, ["workdirr=x"])


def test_stage_selection() -> None:
    names = [spec.name for spec in STAGES]
    assert select_stages(names, start="register") == ["register", "serve"]
    assert select_stages(names, stages=["serve", "shard"]) == ["shard", "serve"]
    with pytest.raises(ValueError, match="unknown stage 'fine'"):
        select_stages(names, stages=["fine"])


def test_shard_stage_runs_records_and_is_skipped_on_rerun(ray_local, tmp_path: Path, capsys) -> None:
    from mlflow.tracking import MlflowClient

    config = load_pipeline_config(None, [*TINY, f"workdir={tmp_path / 'runs'}"])
    results = run_pipeline(config, stages=["shard"], reporter=Reporter())
    shard = next(r for r in results if r.name == "shard")
    assert shard.state == "done"
    record = read_record(str(tmp_path / "runs" / "shard"))
    assert record["outputs"]["shards"] == str(tmp_path / "runs" / "shard" / "out")
    assert record["metrics"]["rows_out"] > 0 and record["code_version"]
    out = capsys.readouterr().out
    assert "[1/7] shard     done in" in out and "stage     state" in out

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("vitpose").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and [c.info.run_name for c in children] == ["shard"]
    assert children[0].data.metrics["rows_out"] == record["metrics"]["rows_out"]
    assert all(r.info.status == "FINISHED" for r in runs)

    started = time.perf_counter()
    rerun = run_pipeline(config, stages=["shard"], reporter=Reporter())
    assert next(r for r in rerun if r.name == "shard").state == "skipped"
    assert time.perf_counter() - started < 60
    assert read_record(str(tmp_path / "runs" / "shard"))["mlflow_run_id"] == record["mlflow_run_id"]

    # a changed config is not "the same config": the stage runs again
    changed = load_pipeline_config(None, [*TINY, "shard.rows_per_file=4", f"workdir={tmp_path / 'runs'}"])
    with pytest.raises(ValueError, match="--force"):  # the shard stage refuses to overwrite silently ...
        run_pipeline(changed, stages=["shard"], reporter=Reporter())
    forced = run_pipeline(changed, stages=["shard"], force=True, reporter=Reporter())  # ... unless forced
    assert next(r for r in forced if r.name == "shard").state == "done"


def test_a_stage_without_its_inputs_says_which_to_run_first(ray_local, tmp_path: Path) -> None:
    config = load_pipeline_config(None, [*TINY, f"workdir={tmp_path / 'runs'}"])
    with pytest.raises(RuntimeError, match="needs the output of 'register'"):
        run_pipeline(config, stages=["serve"], reporter=Reporter())
