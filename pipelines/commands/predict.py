"""`vitpose predict`: keypoints for the people in one image, as JSON plus a PNG with the poses drawn.

    vitpose predict --checkpoint CKPT --image IMG [--boxes X,Y,W,H ...] [--output-dir DIR]

Without boxes the whole image is one person box (ViTPose is top-down: it needs person boxes).
Writes DIR/<image stem>.pose.json and DIR/<image stem>.pose.png and prints the JSON path.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("predict", help="keypoints of one image -> JSON + PNG",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="own format dir or official .pth")
    source.add_argument("--url", help="send the image to a running pose service instead (`vitpose serve`), "
                                      "e.g. http://127.0.0.1:8000")
    parser.add_argument("--image", required=True, type=Path, help="input image (jpg/png)")
    parser.add_argument("--boxes", nargs="+", default=None, metavar="X,Y,W,H",
                        help="person boxes in pixels, or one path to a json list of [x, y, w, h]")
    parser.add_argument("--dataset", default=None,
                        help="multi-dataset checkpoint: the dataset (its name) whose decoder predicts")
    parser.add_argument("--flip-test", action="store_true", help="average with the horizontally flipped crop")
    parser.add_argument("--score-thr", type=float, default=0.3, help="do not draw keypoints scoring below")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--output-dir", type=Path, default=Path("."), help="where to write the JSON and PNG")
    parser.set_defaults(func=run)


def parse_boxes(values: list[str] | None) -> np.ndarray | None:
    """`["10,20,30,40", ...]` or `["boxes.json"]` -> boxes [P, 4]; None stays None (whole image)."""
    if not values:
        return None
    if len(values) == 1 and values[0].endswith(".json"):
        from vitpose_core.errors import read_json_file

        rows = read_json_file(values[0], "boxes")
    else:
        try:
            rows = [[float(v) for v in value.split(",")] for value in values]
        except ValueError:
            raise ValueError(f"--boxes must be X,Y,W,H numbers, got {values}") from None
    try:
        boxes = np.asarray(rows, dtype=np.float64)
    except (ValueError, TypeError):
        raise ValueError(f"--boxes must be [x, y, w, h] numbers, got {rows}") from None
    if boxes.ndim != 2 or boxes.shape[1] != 4 or not np.all(np.isfinite(boxes)) or np.any(boxes[:, 2:] <= 0):
        raise ValueError(f"--boxes must be finite [x, y, w, h] with w, h > 0, got {rows}")
    return boxes


def served_keypoint_set(info: dict):
    """The keypoint set a pose service reports (`/v1/model`): a built-in set when its name and keypoint
    names are one, else a set from the names (flip pairs inferred; the skeleton the service reports, if any)."""
    from vitpose_core.keypoints import (
        DEFAULT_SIGMA,
        KEYPOINT_SETS,
        KeypointSet,
        infer_flip_pairs,
        infer_upper_body,
    )

    names = list(info.get("keypoint_names") or [])
    builtin = KEYPOINT_SETS.get(info["keypoint_set"])
    if builtin is not None and list(builtin.names) == names:
        return builtin
    return KeypointSet(info["keypoint_set"], names, infer_flip_pairs(names), info.get("skeleton") or (),
                       (DEFAULT_SIGMA,) * len(names), infer_upper_body(names))


def run(args: argparse.Namespace) -> int:
    from vitpose_core.errors import InvalidInputError
    from vitpose_core.image_io import check_boxes_in_image, read_image_rgb

    boxes = parse_boxes(args.boxes)
    json_path = args.output_dir / f"{args.image.stem}.pose.json"
    png_path = args.output_dir / f"{args.image.stem}.pose.png"
    inputs = [args.image] + ([Path(args.boxes[0])] if args.boxes and len(args.boxes) == 1 else [])
    for output in (json_path, png_path):
        if any(output.resolve() == Path(item).resolve() for item in inputs):
            raise InvalidInputError(f"output {output} would overwrite an input file; choose another --output-dir")
    image = read_image_rgb(args.image)  # the server's size limits, from the header before decoding
    if boxes is not None:
        check_boxes_in_image(boxes, image.shape[1], image.shape[0], "--boxes")
    # the heavy imports (torch: seconds, ~800 MB) only once the inputs are known to be good
    import cv2

    from vitpose_core import load_model
    from vitpose_core.inference import TopDownPredictor, resolve_device, whole_image_box
    from vitpose_core.visualize import draw_poses
    if args.url:  # the service decides flip test and dtype; boxes None -> its detector / whole image
        import requests

        from pipelines.serve.client import PoseClient, PoseClientError

        client = PoseClient(args.url)
        try:
            response = client.predict(args.image, boxes=boxes)
            keypoint_set = served_keypoint_set(client.model_info())
        except requests.ConnectionError as error:
            raise InvalidInputError(f"cannot reach the pose service at {args.url}: {type(error).__name__}") from None
        except requests.Timeout:
            raise InvalidInputError(f"the pose service at {args.url} did not answer in time") from None
        except PoseClientError as error:  # the service refused the request (4xx) or is overloaded (503)
            raise InvalidInputError(f"the pose service at {args.url} answered {error}") from None
        boxes = np.array([p["box"] for p in response["persons"]]).reshape(-1, 4)
        keypoints = np.array([p["keypoints"] for p in response["persons"]]).reshape(len(boxes), -1, 3)
        model_name = f"{response['model']}:{response['version']}"
    else:
        if not args.checkpoint.exists():
            raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
        model = load_model(args.checkpoint, dataset=args.dataset).to(resolve_device(args.device))
        keypoint_set = model.config.keypoint_set_data  # recorded in the checkpoint, custom sets included
        predictor = TopDownPredictor(model, keypoint_set, flip_test=args.flip_test)
        boxes = whole_image_box(image) if boxes is None else boxes
        keypoints = predictor.predict(image, boxes)
        model_name = model.config.variant
    if not np.all(np.isfinite(keypoints)):
        source = args.url or f"checkpoint {args.checkpoint} (NaN or Inf weights?)"
        raise InvalidInputError(f"the model produced non-finite keypoints or scores for {args.image}: {source}")

    args.output_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "image": str(args.image), "width": image.shape[1], "height": image.shape[0],
        "model": model_name, "keypoint_set": keypoint_set.name, "keypoint_names": list(keypoint_set.names),
        "skeleton": [list(limb) for limb in keypoint_set.skeleton],
        "persons": [{"box": box.tolist(), "keypoints": person.tolist(),
                     "score": float(person[:, 2].mean())} for box, person in zip(boxes, keypoints, strict=True)],
    }
    json_path.write_text(json.dumps(record, indent=2, allow_nan=False))
    drawn = draw_poses(image, keypoints, keypoint_set, args.score_thr, boxes_xywh=boxes)
    cv2.imwrite(str(png_path), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
    print(json_path)
    return 0
