"""The detect stage's place in the pipeline files, with no compute: optional, derived, planned.

- local.yaml has no detect section, so its pipeline has no detect stage (not run, not planned, and a stale
  detect record is not read by register or serve); local_detect.yaml is local.yaml plus a detect section;
- with a detect section, register scores the champion on the detector's val boxes and serve loads the
  registered detector (placeholders before anything ran);
- the cluster configs' commented-out detect section, uncommented, plans (GPU task checked against
  ray_cluster.yaml);
- torchvision weights files: backbone (ImageNet MobileNetV3) tensors land in the detector, a file that fits
  nothing is an error.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml
from paths import REPO_ROOT

from pipelines.config import ConfigError, load_yaml
from pipelines.pipeline import (
    STAGE_NAMES,
    load_pipeline_config,
    pipeline_specs,
    run_pipeline,
    validate_sections,
)
from pipelines.plan import build_plan

CONFIGS = REPO_ROOT / "pipelines" / "configs"
CLUSTER_CONFIGS = ("cocoaic_vitpose_b_8gpu.yaml", "vitpose_h_fsdp.yaml")


def test_local_detect_is_local_plus_a_detect_section():
    local, detect = load_yaml(CONFIGS / "local.yaml"), load_yaml(CONFIGS / "local_detect.yaml")
    assert detect.pop("name") == "local-detect" and local.pop("name") == "local"
    assert detect.pop("detect")["train"]["epochs"] == 12
    assert detect == local, "local_detect.yaml must be local.yaml plus its detect section: copy local.yaml's change"


def test_a_pipeline_without_a_detect_section_has_no_detect_stage(tmp_path):
    default = load_pipeline_config(None)
    names = [spec.name for spec in pipeline_specs(default)]
    assert "detect" in STAGE_NAMES and "detect" not in names and len(names) == len(STAGE_NAMES) - 1
    configs = validate_sections(default)
    assert "detect" not in configs and configs["register"].detections is None
    assert configs["serve"].detector.import_path is None  # box-free requests: one whole-image box, as before
    assert list(build_plan(default, check_cluster=False)["stages"]) == names
    with pytest.raises(ConfigError, match=r"\['detect'\] have no section in this pipeline file"):
        run_pipeline(default.model_copy(update={"workdir": str(tmp_path)}), stages=["detect"])


def test_with_a_detect_section_register_and_serve_derive_from_it():
    config = load_pipeline_config(CONFIGS / "local_detect.yaml")
    assert [spec.name for spec in pipeline_specs(config)][:3] == ["shard", "detect", "pretrain"]
    configs = validate_sections(config)
    detect = configs["detect"]
    assert detect.model_name == "vitpose-detector" and detect.alias == "champion"  # <register.model_name>-detector
    assert detect.data.shards == "<shard.shards>" and detect.train.epochs == 12
    assert configs["register"].detections == "<detect.val_detections>"
    assert configs["serve"].detector.import_path == "pipelines.serve.detector:TorchvisionPersonDetector"
    assert configs["serve"].detector.init_kwargs == {"path": "<detect.model_uri>"}
    renamed = validate_sections(load_pipeline_config(CONFIGS / "local_detect.yaml", ["register.model_name=pose"]))
    assert renamed["detect"].model_name == "pose-detector"
    with pytest.raises(ConfigError, match=r"\[detect\] invalid DetectConfig .*\n\s+unknown key 'train.epoch'"):
        load_pipeline_config(CONFIGS / "local_detect.yaml", ["detect.train.epoch=3"])
    # a section added from the command line is a section too
    added = load_pipeline_config(None, ["detect.train.epochs=2"])
    assert "detect" in [spec.name for spec in pipeline_specs(added)]


def commented_detect_section(path) -> dict:
    """The `# detect:` block of a cluster config, uncommented."""
    lines = path.read_text().splitlines()
    start = lines.index("# detect:")
    block = [lines[start][2:]]
    for line in lines[start + 1:]:
        if not line.startswith("#   "):
            break
        block.append(line[2:])
    return yaml.safe_load("\n".join(block))


@pytest.mark.parametrize("name", CLUSTER_CONFIGS)
def test_the_cluster_configs_commented_detect_section_validates_and_plans(name, tmp_path, capsys):
    from pipelines.cli import main

    section = commented_detect_section(CONFIGS / name)
    overlay = tmp_path / "detect.yaml"
    overlay.write_text(yaml.safe_dump(section))
    assert "detect" not in [spec.name for spec in pipeline_specs(load_pipeline_config(CONFIGS / name))]

    code = main(["plan", "--config", str(CONFIGS / name), "--overlay", str(overlay), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    plan = json.loads(captured.out)
    assert list(plan["stages"])[:2] == ["shard", "detect"]
    assert plan["resources"]["detect"] == {"tasks": 1, "per_task": {"CPU": 8.0, "GPU": 1.0}}
    assert plan["stages"]["detect"]["detector"]["architecture"] == "fasterrcnn_mobilenet_v3_large_320_fpn"

    code = main(["plan", "--config", str(CONFIGS / name), "--overlay", str(overlay),
                 "--set", "detect.resources.num_gpus=16"])
    assert code == 2
    assert re.search(r"\[detect\] detect.resources.num_gpus = 16 GPU per task, but no node type", capsys.readouterr().err)


def test_torchvision_backbone_weights_load_into_the_detector_and_unfitting_weights_are_an_error():
    import torch
    from torchvision.models import mobilenet_v3_small

    from vitpose_core.detection import DetectorConfig, build_detector, load_matching_weights

    torch.manual_seed(0)
    imagenet = mobilenet_v3_small(weights=None).state_dict()  # the layout of torchvision's ImageNet file
    model = build_detector(DetectorConfig())
    loaded = load_matching_weights(model, imagenet)
    feature_keys = [key for key in imagenet if key.startswith("features.")]
    assert loaded and all(name.startswith("backbone.body.") for name in loaded)
    name = loaded[0]
    source = "features." + name.removeprefix("backbone.body.")
    assert torch.equal(model.state_dict()[name], imagenet[source]) and len(loaded) <= len(feature_keys)
    with pytest.raises(ValueError, match="none of the 1 tensors of the weights fit the detector"):
        load_matching_weights(model, {"classifier.weight": torch.zeros(3, 3)})
