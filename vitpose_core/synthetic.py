"""Procedural people with COCO, AIC or MPII keypoints: the embedded default's data and the benchmarks' input.

Each image shows a few front-facing stick-and-blob people (torso, limbs, head with eyes) on a muted,
textured background, with occluders (other people in front, random objects). Appearance is kept
simple on purpose so a tiny ViT learns it in minutes on two CPUs:

- every limb segment has its own saturated colour, and the left side's colours (warm) differ from
  the right side's (cool), so left and right are visible, not only inferable from the pose;
- joints carry a small dark disc, so a keypoint is a local pattern, not just the end of a stroke;
- people always face the camera: the person's left is on the image right, as in most of COCO.
  (Horizontal flip augmentation with a left/right label swap keeps that geometric cue but makes the
  colour cue ambiguous; the model learns the geometry.)

People are drawn the same in every layout; `SyntheticConfig.layout` picks which keypoints are
labelled: "coco" (17), "aic" (14: adds head_top and neck), "mpii" (16: adds pelvis, thorax,
upper_neck and head_top) or "posetrack18" (17: head_bottom and head_top instead of the eyes). The
extra points are geometric: neck and thorax sit between the shoulders, pelvis between the hips,
head_top and upper_neck / head_bottom at the top and bottom of the head disc. A second layout is
what multi-dataset training needs to show decoders for different keypoint sets.

Visibility follows COCO: 2 = labelled and visible, 1 = labelled but occluded by a person drawn in
front or by an object, 0 = outside the image (x = y = 0).

``area`` (the scale OKS divides by, so the AP a layout's sigmas give) follows each layout's real dataset:
the visible silhouette in the COCO layout (COCO's segmentation area); the box area (w x h) in the other
layouts, whose datasets have no segmentation: AI Challenger's official evaluation divides by the box area
and its sigmas are calibrated for it, and this project's AIC / MPII loaders fill area = w x h
(``vitpose_core.datasets``, ``evaluation.load_ground_truth``). With the silhouette (about a quarter of the
box) AIC's small sigmas made OKS twice as strict again as on real AIC, and a trained model scored AP 0. Everything is deterministic in
`(seed, image index)`, so any single image can be regenerated without drawing the ones before it.
"""

from __future__ import annotations

import colorsys
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

from vitpose_core.keypoints import COCO, KeypointSet, get_keypoint_set

# COCO indices, named for readability below
NOSE, L_EYE, R_EYE, L_EAR, R_EAR = 0, 1, 2, 3, 4
L_SHO, R_SHO, L_ELB, R_ELB, L_WRI, R_WRI = 5, 6, 7, 8, 9, 10
L_HIP, R_HIP, L_KNE, R_KNE, L_ANK, R_ANK = 11, 12, 13, 14, 15, 16

# (from, to, hue in degrees): warm hues on the left side, cool hues on the right side
LIMBS: tuple[tuple[int, int, float], ...] = (
    (L_SHO, L_ELB, 0.0), (L_ELB, L_WRI, 35.0), (L_HIP, L_KNE, 300.0), (L_KNE, L_ANK, 55.0),
    (R_SHO, R_ELB, 210.0), (R_ELB, R_WRI, 180.0), (R_HIP, R_KNE, 120.0), (R_KNE, R_ANK, 250.0),
)


@dataclass(frozen=True)
class SyntheticConfig:
    """How many images, how large, and how crowded. All fields are JSON-serialisable."""

    num_images: int = 200
    width: int = 320
    height: int = 240
    min_people: int = 1
    max_people: int = 4
    min_person_height: float = 0.45  # fraction of the image height
    max_person_height: float = 0.95
    occluder_prob: float = 0.4  # chance of each of up to 2 random objects per image
    seed: int = 0
    jpeg_quality: int = 92
    layout: str = "coco"  # which keypoints are labelled: coco, aic, mpii or posetrack18

    def __post_init__(self) -> None:
        if self.layout not in SYNTHETIC_LAYOUTS:
            raise ValueError(f"unknown synthetic layout {self.layout!r}; choose one of {SYNTHETIC_LAYOUTS}")
        if self.num_images < 0 or self.width < 32 or self.height < 32:
            raise ValueError(f"bad synthetic size: {self.num_images} images of {self.width}x{self.height}")
        if not 1 <= self.min_people <= self.max_people:
            raise ValueError(f"need 1 <= min_people <= max_people, got {self.min_people}, {self.max_people}")


SYNTHETIC_LAYOUTS: tuple[str, ...] = ("coco", "aic", "mpii", "posetrack18")
# layouts whose `area` is the silhouette (COCO's segmentation area); the others carry the box area (module doc)
SEGMENTATION_AREA_LAYOUTS: tuple[str, ...] = ("coco",)


def layout_keypoint_set(layout: str) -> KeypointSet:
    if layout not in SYNTHETIC_LAYOUTS:
        raise ValueError(f"unknown synthetic layout {layout!r}; choose one of {SYNTHETIC_LAYOUTS}")
    return get_keypoint_set(layout)


def layout_points(kp: np.ndarray, height: float, keypoint_set: KeypointSet) -> np.ndarray:
    """A person's points [K, 2] in ``keypoint_set``'s order from its COCO joints [17, 2] (see module doc)."""
    neck = (kp[L_SHO] + kp[R_SHO]) / 2
    pelvis = (kp[L_HIP] + kp[R_HIP]) / 2
    up = (neck - pelvis) / max(float(np.linalg.norm(neck - pelvis)), 1e-6)  # hips -> neck
    head = (kp[L_EAR] + kp[R_EAR]) / 2
    radius = 0.065 * height  # the head disc drawn by _draw_person
    points = {name: kp[i] for i, name in enumerate(COCO.names)}
    points.update(neck=neck, thorax=neck, pelvis=pelvis, head_top=head + up * radius,
                  upper_neck=head - up * radius, head_bottom=head - up * radius)
    return np.stack([points[name] for name in keypoint_set.names])


def _bgr(hue_deg: float, saturation: float, value: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((hue_deg % 360.0) / 360.0, saturation, value)
    return int(b * 255), int(g * 255), int(r * 255)


def _direction(angle_deg: float) -> np.ndarray:
    """Unit vector for an angle measured from straight down, positive towards image +x."""
    a = np.deg2rad(angle_deg)
    return np.array([np.sin(a), np.cos(a)])


def sample_pose(rng: np.random.Generator, hip_center: np.ndarray, height: float) -> np.ndarray:
    """Joint positions [17, 2] of a front-facing person `height` pixels tall (head top to ankles)."""
    kp = np.zeros((COCO.num_keypoints, 2))
    lean = rng.uniform(-12, 12)
    up = -_direction(lean)  # from the hips towards the neck
    side = np.array([-up[1], up[0]])  # towards the person's left = image right
    if side[0] < 0:
        side = -side
    neck = hip_center + up * 0.30 * height
    kp[L_SHO], kp[R_SHO] = neck + side * 0.12 * height, neck - side * 0.12 * height
    kp[L_HIP], kp[R_HIP] = hip_center + side * 0.08 * height, hip_center - side * 0.08 * height
    head = neck + up * 0.12 * height
    r = 0.065 * height
    kp[NOSE] = head + up * -0.15 * r
    kp[L_EYE], kp[R_EYE] = head + side * 0.38 * r + up * 0.2 * r, head - side * 0.38 * r + up * 0.2 * r
    kp[L_EAR], kp[R_EAR] = head + side * 0.95 * r, head - side * 0.95 * r
    for sign, (sho, elb, wri) in ((1, (L_SHO, L_ELB, L_WRI)), (-1, (R_SHO, R_ELB, R_WRI))):
        upper = rng.uniform(-25, 160)  # 0 = arm hanging down, 90 = horizontal, outwards
        bend = upper + rng.uniform(-30, 120)
        kp[elb] = kp[sho] + _direction(lean + sign * upper) * 0.17 * height
        kp[wri] = kp[elb] + _direction(lean + sign * bend) * 0.15 * height
    for sign, (hip, kne, ank) in ((1, (L_HIP, L_KNE, L_ANK)), (-1, (R_HIP, R_KNE, R_ANK))):
        thigh = rng.uniform(-10, 55)
        shin = thigh + rng.uniform(-50, 30)
        kp[kne] = kp[hip] + _direction(lean + sign * thigh) * 0.24 * height
        kp[ank] = kp[kne] + _direction(lean + sign * shin) * 0.23 * height
    return kp


def _draw_person(canvas: np.ndarray, mask: np.ndarray, kp: np.ndarray, height: float,
                 rng: np.random.Generator) -> None:
    """Draw one person onto `canvas` (BGR) and its silhouette onto `mask` (uint8, 255 = person)."""
    shift = 4  # cv2 sub-pixel drawing: coordinates in 1/16 px so joints land where labelled
    pts = lambda *idx: np.round(kp[list(idx)] * (1 << shift)).astype(np.int32)  # noqa: E731
    hue_jitter = rng.uniform(-12, 12)
    torso_colour = _bgr(rng.uniform(0, 360), rng.uniform(0.1, 0.35), rng.uniform(0.35, 0.7))
    skin = _bgr(rng.uniform(15, 35), rng.uniform(0.3, 0.6), rng.uniform(0.55, 0.95))
    limb_width = max(2, int(round(0.05 * height)))
    for target, colour_of in ((canvas, None), (mask, 255)):
        torso = pts(L_SHO, R_SHO, R_HIP, L_HIP)
        cv2.fillConvexPoly(target, torso, colour_of or torso_colour, cv2.LINE_AA, shift)
        for a, b, hue in LIMBS:
            colour = colour_of or _bgr(hue + hue_jitter, 0.85, 0.9)
            width = int(limb_width * (1.25 if a in (L_HIP, R_HIP, L_KNE, R_KNE) else 1.0))
            cv2.line(target, tuple(pts(a)[0]), tuple(pts(b)[0]), colour, width, cv2.LINE_AA, shift)
        head = (kp[L_EAR] + kp[R_EAR]) / 2
        radius = int(round(0.065 * height * (1 << shift)))
        cv2.circle(target, tuple(np.round(head * (1 << shift)).astype(int)), radius, colour_of or skin,
                   -1, cv2.LINE_AA, shift)
    # joint discs and facial features: local patterns at the labelled points (canvas only)
    dot = max(1, limb_width // 3) << shift
    for j in (L_SHO, R_SHO, L_ELB, R_ELB, L_WRI, R_WRI, L_HIP, R_HIP, L_KNE, R_KNE, L_ANK, R_ANK):
        cv2.circle(canvas, tuple(pts(j)[0]), dot, (30, 30, 30), -1, cv2.LINE_AA, shift)
    face_dot = max(1, int(0.012 * height)) << shift
    for j, colour in ((L_EYE, (40, 20, 20)), (R_EYE, (40, 20, 20)), (NOSE, (40, 40, 170)),
                      (L_EAR, (20, 90, 160)), (R_EAR, (160, 90, 20))):
        cv2.circle(canvas, tuple(pts(j)[0]), face_dot, colour, -1, cv2.LINE_AA, shift)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Muted gradient with low-saturation shapes and noise, so people (saturated) stand out."""
    top = np.array(_bgr(rng.uniform(0, 360), rng.uniform(0, 0.3), rng.uniform(0.3, 0.9)), np.float32)
    bottom = np.array(_bgr(rng.uniform(0, 360), rng.uniform(0, 0.3), rng.uniform(0.2, 0.8)), np.float32)
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    image = (top * (1 - t) + bottom * t) * np.ones((1, width, 1), np.float32)
    for _ in range(rng.integers(2, 8)):
        colour = _bgr(rng.uniform(0, 360), rng.uniform(0, 0.25), rng.uniform(0.2, 0.9))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        if rng.random() < 0.5:
            cv2.rectangle(image, (x, y), (x + int(rng.integers(10, width // 2)), y + int(rng.integers(10, height // 2))),
                          colour, -1)
        else:
            cv2.ellipse(image, (x, y), (int(rng.integers(5, width // 4)), int(rng.integers(5, height // 4))),
                        float(rng.uniform(0, 180)), 0, 360, colour, -1)
    image += rng.normal(0.0, rng.uniform(2, 10), image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def _occluder(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray) -> None:
    """A random textured object drawn in front of everything, mirrored into `mask`."""
    h, w = canvas.shape[:2]
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    ax, ay = rng.uniform(0.05, 0.2) * w, rng.uniform(0.05, 0.25) * h
    colour = _bgr(rng.uniform(0, 360), rng.uniform(0.0, 0.4), rng.uniform(0.2, 0.8))
    if rng.random() < 0.5:
        box = (int(cx - ax), int(cy - ay)), (int(cx + ax), int(cy + ay))
        cv2.rectangle(canvas, *box, colour, -1)
        cv2.rectangle(mask, *box, 255, -1)
    else:
        args = (int(cx), int(cy)), (int(ax), int(ay)), float(rng.uniform(0, 180)), 0, 360
        cv2.ellipse(canvas, *args, colour, -1)
        cv2.ellipse(mask, *args, 255, -1)


def render_image(index: int, config: SyntheticConfig) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Draw image `index` of the dataset `config` describes.

    Returns:
        The BGR uint8 image [H, W, 3] and one dict per person: `keypoints` float [K, 3] (x, y, v)
        in the config's layout (K = 17 for COCO),
        `bbox` [x, y, w, h] (amodal, clipped to the image), `area` (visible pixels in the COCO layout,
        else the box area: module doc) and
        `num_keypoints`.
    """
    rng = np.random.default_rng([config.seed, index])
    w, h = config.width, config.height
    canvas = _background(rng, w, h)
    num_people = int(rng.integers(config.min_people, config.max_people + 1))
    people = []
    for _ in range(num_people):
        height = rng.uniform(config.min_person_height, config.max_person_height) * h
        hip = np.array([rng.uniform(0.1, 0.9) * w, rng.uniform(0.35, 0.65) * h + 0.1 * height])
        people.append((height, sample_pose(rng, hip, height)))
    people.sort(key=lambda p: float(p[1][[L_ANK, R_ANK], 1].max()))  # feet lower = nearer = drawn later
    masks = []
    for height, kp in people:
        mask = np.zeros((h, w), np.uint8)
        _draw_person(canvas, mask, kp, height, rng)
        masks.append(mask)
    objects = np.zeros((h, w), np.uint8)
    for _ in range(2):
        if rng.random() < config.occluder_prob:
            _occluder(rng, canvas, objects)
    annotations = []
    keypoint_set = layout_keypoint_set(config.layout)
    for i, (height, kp) in enumerate(people):
        in_front = objects.copy()
        for later in masks[i + 1:]:
            in_front |= later
        keypoints = np.zeros((keypoint_set.num_keypoints, 3))
        for j, (x, y) in enumerate(layout_points(kp, height, keypoint_set)):
            if not (0 <= x <= w - 1 and 0 <= y <= h - 1):
                continue  # outside the image: unlabelled, as in COCO
            occluded = in_front[int(round(y)), int(round(x))] > 0
            keypoints[j] = (x, y, 1 if occluded else 2)
        ys, xs = np.nonzero(masks[i])
        visible_area = int(np.count_nonzero(masks[i] & ~in_front))
        bbox = [0.0, 0.0, 0.0, 0.0]
        if len(xs):
            bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        area = float(visible_area) if config.layout in SEGMENTATION_AREA_LAYOUTS else bbox[2] * bbox[3]
        annotations.append({"keypoints": keypoints, "bbox": bbox, "area": area,
                            "num_keypoints": int((keypoints[:, 2] > 0).sum())})
    return canvas, annotations


def image_file_name(index: int) -> str:
    return f"{index:08d}.jpg"


def iter_dataset(config: SyntheticConfig, start: int = 0, stop: int | None = None
                 ) -> Iterator[tuple[dict[str, Any], bytes, list[dict[str, Any]]]]:
    """Yield `(coco image entry, jpeg bytes, coco annotations)` for images `start..stop`.

    Image ids are `index + 1` and annotation ids `image_id * 100 + person`, so any slice of the
    dataset can be produced on its own (in parallel, or on the fly in a benchmark).
    """
    stop = config.num_images if stop is None else min(stop, config.num_images)
    for index in range(start, stop):
        image, people = render_image(index, config)
        ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, config.jpeg_quality])
        if not ok:
            raise RuntimeError(f"cv2 could not encode synthetic image {index}")
        image_id = index + 1
        entry = {"id": image_id, "file_name": image_file_name(index), "width": config.width, "height": config.height}
        annotations = [
            {
                "id": image_id * 100 + p, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                "bbox": [round(v, 2) for v in person["bbox"]], "area": person["area"],
                "keypoints": [round(float(v), 2) for v in person["keypoints"].reshape(-1)],
                "num_keypoints": person["num_keypoints"],
            }
            for p, person in enumerate(people)
        ]
        yield entry, encoded.tobytes(), annotations


def coco_document(images: list[dict[str, Any]], annotations: list[dict[str, Any]],
                  config: SyntheticConfig) -> dict[str, Any]:
    """A COCO person_keypoints document (loads with pycocotools) for the given entries."""
    return {
        "info": {"description": "vitpose_core.synthetic", "config": asdict(config)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [layout_keypoint_set(config.layout).coco_category()],
    }


def coco_json(images: list[dict[str, Any]], annotations: list[dict[str, Any]], config: SyntheticConfig) -> bytes:
    return json.dumps(coco_document(images, annotations, config), separators=(",", ":")).encode()
