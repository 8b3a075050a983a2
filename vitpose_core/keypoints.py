"""Keypoint sets: names, left/right flip pairs, skeleton, OKS sigmas and upper-body indices, as data.

A `KeypointSet` is everything the codec, the evaluator, augmentation and drawing need to know about
a dataset's keypoints. Sigmas are the per-keypoint OKS constants (already divided by 10, as in
pycocotools' `COCOeval.kpt_oks_sigmas`). Skeletons are 0-based index pairs here; COCO files store
them 1-based.

Where a set comes from:

* built in (`KEYPOINT_SETS`): coco, aic, mpii, crowdpose, ochuman (COCO-17 layout), ap10k (17
  animal keypoints), coco_wholebody (133) and posetrack18 (17, COCO-like with head_bottom/head_top);
* a COCO-format file's category (`keypoints`, `skeleton`): a file whose names are a built-in set's
  gets that set (its published sigmas); any other gets a custom set with flip pairs inferred from
  left/right names and `DEFAULT_SIGMA` for every keypoint (with a warning);
* a keypoint-set YAML file (`load_keypoint_set_yaml`), which can take the names and skeleton from a
  COCO file and add sigmas, flip pairs and upper-body keypoints.

`resolve_keypoint_set("SET name | path to a COCO json or keypoint-set YAML")` accepts all three.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from vitpose_core.errors import InvalidInputError

logger = logging.getLogger(__name__)

# Sigma given to keypoints whose OKS constant nobody provided: the median of COCO's 17 sigmas (the
# elbows, 0.072). Evaluation with it is a guess about annotation noise, so it is logged as one.
DEFAULT_SIGMA = 0.072


class KeypointSetError(InvalidInputError):
    """A keypoint set (or the file it comes from) is malformed; the message names the file or field."""


@dataclass(frozen=True)
class KeypointSet:
    name: str
    names: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    skeleton: tuple[tuple[int, int], ...]  # 0-based index pairs
    sigmas: tuple[float, ...]
    upper_body: tuple[int, ...]  # indices used by half-body augmentation
    sigmas_guessed: bool = field(default=False, compare=False)  # True when sigmas are DEFAULT_SIGMA fill-ins

    def __post_init__(self) -> None:
        # normalise containers (lists from JSON/YAML) so equality and hashing work
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        object.__setattr__(self, "flip_pairs", tuple((int(a), int(b)) for a, b in self.flip_pairs))
        object.__setattr__(self, "skeleton", tuple((int(a), int(b)) for a, b in self.skeleton))
        object.__setattr__(self, "sigmas", tuple(float(s) for s in self.sigmas))
        object.__setattr__(self, "upper_body", tuple(int(i) for i in self.upper_body))
        count = len(self.names)
        where = f"keypoint set {self.name!r}"
        if not self.name or not count:
            raise KeypointSetError(f"{where}: needs a name and at least one keypoint")
        if len(set(self.names)) != count:
            duplicated = sorted({n for n in self.names if self.names.count(n) > 1})
            raise KeypointSetError(f"{where}: duplicated keypoint names {duplicated}")
        if len(self.sigmas) != count:
            raise KeypointSetError(f"{where}: {len(self.sigmas)} sigmas for {count} keypoints")
        if not all(s > 0 and np.isfinite(s) for s in self.sigmas):
            raise KeypointSetError(f"{where}: sigmas must be positive finite numbers")
        for what, pairs in (("flip_pairs", self.flip_pairs), ("skeleton", self.skeleton)):
            bad = [pair for pair in pairs if not all(0 <= i < count for i in pair) or pair[0] == pair[1]]
            if bad:
                raise KeypointSetError(f"{where}: {what} {bad} are not pairs of distinct indices in 0..{count - 1}")
        flipped = [i for pair in self.flip_pairs for i in pair]
        if len(set(flipped)) != len(flipped):
            raise KeypointSetError(f"{where}: a keypoint appears in more than one flip pair: {self.flip_pairs}")
        if not all(0 <= i < count for i in self.upper_body):
            raise KeypointSetError(f"{where}: upper_body indices {self.upper_body} outside 0..{count - 1}")

    @property
    def num_keypoints(self) -> int:
        return len(self.names)

    @property
    def flip_index(self) -> list[int]:
        """Permutation that swaps left and right: `flipped[:, i] = original[:, flip_index[i]]`."""
        index = list(range(self.num_keypoints))
        for left, right in self.flip_pairs:
            index[left], index[right] = right, left
        return index

    def sigmas_array(self) -> np.ndarray:
        return np.asarray(self.sigmas, dtype=np.float64)

    def renamed(self, name: str) -> KeypointSet:
        return KeypointSet(name, self.names, self.flip_pairs, self.skeleton, self.sigmas, self.upper_body,
                           self.sigmas_guessed)

    def same_layout(self, other: KeypointSet) -> bool:
        """Same keypoints, flips, skeleton, sigmas and upper body (the name may differ)."""
        return (self.names, self.flip_pairs, self.skeleton, self.sigmas, self.upper_body) == (
            other.names, other.flip_pairs, other.skeleton, other.sigmas, other.upper_body)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable record (what checkpoints store)."""
        return {"name": self.name, "names": list(self.names), "flip_pairs": [list(p) for p in self.flip_pairs],
                "skeleton": [list(p) for p in self.skeleton], "sigmas": list(self.sigmas),
                "upper_body": list(self.upper_body)}

    @classmethod
    def from_dict(cls, record: dict[str, Any], source: str = "keypoint set record") -> KeypointSet:
        try:
            spec = KeypointSetRecord.model_validate(record)
        except ValidationError as error:
            raise KeypointSetError(f"{source}: {' '.join(str(error).split())}") from None
        return spec.to_set()

    def coco_category(self, category_id: int = 1, name: str = "person") -> dict[str, Any]:
        """The COCO category entry of this set (1-based skeleton, as COCO files store it)."""
        return {"id": category_id, "name": name, "supercategory": name, "keypoints": list(self.names),
                "skeleton": [[a + 1, b + 1] for a, b in self.skeleton]}


class KeypointSetRecord(BaseModel):
    """A keypoint set as stored in checkpoints and configs (strict: unknown fields are errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    names: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    skeleton: tuple[tuple[int, int], ...]
    sigmas: tuple[float, ...]
    upper_body: tuple[int, ...]

    def to_set(self) -> KeypointSet:
        return KeypointSet(self.name, self.names, self.flip_pairs, self.skeleton, self.sigmas, self.upper_body)

    @classmethod
    def of(cls, keypoint_set: KeypointSet) -> KeypointSetRecord:
        return cls(**keypoint_set.to_dict())


# ----------------------------------------------------------------------------------------------------------
# inference from names


_NAME_ALIASES = {"top_head": "head_top", "head": "head_top", "headtop": "head_top"}


def canonical_name(name: str) -> str:
    """Lower case, words joined by '_' ('Right Shoulder' -> 'right_shoulder'); used to compare sets."""
    text = re.sub(r"[^0-9a-z]+", "_", str(name).strip().lower()).strip("_")
    return _NAME_ALIASES.get(text, text)


_SIDE_SWAP = {"left": "right", "right": "left", "l": "r", "r": "l"}


def _mirror(name: str) -> str | None:
    """The other side's name ('left_knee' -> 'right_knee', 'L_Eye' -> 'R_Eye'), None if no side word."""
    tokens = re.split(r"([^0-9A-Za-z]+)", name)
    for i, token in enumerate(tokens):
        lower = token.lower()
        if lower in ("left", "right") or (lower in ("l", "r") and i in (0, len(tokens) - 1)):
            swapped = _SIDE_SWAP[lower]
            swapped = swapped.upper() if token.isupper() else swapped.capitalize() if token[0].isupper() else swapped
            return "".join(tokens[:i] + [swapped] + tokens[i + 1:])
        if lower.startswith(("left", "right")):  # 'leftEye'-style camel case
            side = "left" if lower.startswith("left") else "right"
            rest = token[len(side):]
            if rest and rest[0].isupper():
                other = _SIDE_SWAP[side]
                other = other.capitalize() if token[0].isupper() else other
                return "".join(tokens[:i] + [other + rest] + tokens[i + 1:])
    return None


def infer_flip_pairs(names: Sequence[str]) -> tuple[tuple[int, int], ...]:
    """Pairs (left-or-first, other) of keypoints whose names differ only in a left/right word."""
    index = {canonical_name(n): i for i, n in enumerate(names)}
    pairs: list[tuple[int, int]] = []
    seen: set[int] = set()
    for i, name in enumerate(names):
        mirror = _mirror(str(name))
        if mirror is None or i in seen:
            continue
        j = index.get(canonical_name(mirror))
        if j is not None and j != i and j not in seen:
            pairs.append((i, j))
            seen.update((i, j))
    return tuple(pairs)


_UPPER_WORDS = {"nose", "eye", "ear", "head", "neck", "shoulder", "elbow", "wrist", "thorax", "face", "hand",
                "thumb", "finger", "forefinger", "pinky", "mouth", "chin", "lip", "brow", "eyebrow", "front",
                "f", "chest", "throat", "jaw", "forehead"}
_LOWER_WORDS = {"hip", "knee", "ankle", "foot", "toe", "heel", "pelvis", "tail", "back", "b", "paw_b", "leg",
                "thigh", "root"}


def infer_upper_body(names: Sequence[str]) -> tuple[int, ...]:
    """Indices of keypoints whose names say upper body (head, arms, hands, front paws), none that say lower.

    Half-body augmentation crops to these or to the rest; a set whose names say nothing gets ().
    """
    upper = []
    for i, name in enumerate(names):
        words = set(re.split(r"[^0-9a-z]+|(?<=[a-z])(?=\d)", canonical_name(name))) | {canonical_name(name)}
        words |= {w.rstrip("0123456789") for w in words}
        if words & _UPPER_WORDS and not words & _LOWER_WORDS or canonical_name(name).startswith("face"):
            upper.append(i)
    return tuple(upper)


# ----------------------------------------------------------------------------------------------------------
# built-in sets

_COCO_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)
_COCO_SKELETON = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
    (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)
# pycocotools COCOeval.kpt_oks_sigmas
_COCO_SIGMAS = (0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062,
                0.107, 0.107, 0.087, 0.087, 0.089, 0.089)
_COCO_FLIPS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))

COCO = KeypointSet(name="coco", names=_COCO_NAMES, flip_pairs=_COCO_FLIPS, skeleton=_COCO_SKELETON,
                   sigmas=_COCO_SIGMAS, upper_body=tuple(range(11)))

# OCHuman is annotated in COCO's 17-keypoint layout and evaluated with COCO's sigmas
OCHUMAN = COCO.renamed("ochuman")

AIC = KeypointSet(
    name="aic",
    names=(
        "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow", "left_wrist",
        "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
        "head_top", "neck",
    ),
    flip_pairs=((0, 3), (1, 4), (2, 5), (6, 9), (7, 10), (8, 11)),
    skeleton=(
        (2, 1), (1, 0), (0, 13), (13, 3), (3, 4), (4, 5), (8, 7), (7, 6), (6, 9), (9, 10),
        (10, 11), (12, 13), (0, 6), (3, 9),
    ),
    # AI Challenger's own OKS constants (as used by its official evaluation and by mmpose)
    sigmas=(
        0.01388152, 0.01515228, 0.01057665, 0.01417709, 0.01497891, 0.01402144, 0.03909642,
        0.03686941, 0.01981803, 0.03843971, 0.03412318, 0.02415081, 0.01291456, 0.01236173,
    ),
    upper_body=(0, 1, 2, 3, 4, 5, 12, 13),
)

MPII = KeypointSet(
    name="mpii",
    names=(
        "right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle", "pelvis", "thorax",
        "upper_neck", "head_top", "right_wrist", "right_elbow", "right_shoulder", "left_shoulder", "left_elbow",
        "left_wrist",
    ),
    flip_pairs=((0, 5), (1, 4), (2, 3), (10, 15), (11, 14), (12, 13)),
    skeleton=(
        (0, 1), (1, 2), (2, 6), (6, 3), (3, 4), (4, 5), (6, 7), (7, 8), (8, 9), (8, 12), (12, 11), (11, 10),
        (8, 13), (13, 14), (14, 15),
    ),
    # mmpose's MPII sigmas (adapted from COCO's; MPII itself is scored with PCKh)
    sigmas=(0.089, 0.083, 0.107, 0.107, 0.083, 0.089, 0.026, 0.026, 0.026, 0.026, 0.062, 0.072, 0.179, 0.179,
            0.072, 0.062),
    upper_body=(7, 8, 9, 10, 11, 12, 13, 14, 15),
)

CROWDPOSE = KeypointSet(
    name="crowdpose",
    names=(
        "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
        "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle", "top_head", "neck",
    ),
    flip_pairs=((0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11)),
    skeleton=(
        (12, 13), (13, 0), (13, 1), (0, 2), (2, 4), (1, 3), (3, 5), (13, 6), (13, 7), (6, 8), (8, 10),
        (7, 9), (9, 11),
    ),
    # CrowdPose's OKS constants (crowdposetools / mmpose crowdpose.py)
    sigmas=(0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089, 0.079, 0.079),
    upper_body=(0, 1, 2, 3, 4, 5, 12, 13),
)

AP10K = KeypointSet(
    name="ap10k",
    names=(
        "left_eye", "right_eye", "nose", "neck", "root_of_tail", "left_shoulder", "left_elbow", "left_front_paw",
        "right_shoulder", "right_elbow", "right_front_paw", "left_hip", "left_knee", "left_back_paw", "right_hip",
        "right_knee", "right_back_paw",
    ),
    flip_pairs=((0, 1), (5, 8), (6, 9), (7, 10), (11, 14), (12, 15), (13, 16)),
    skeleton=(
        (0, 1), (0, 2), (1, 2), (2, 3), (3, 4), (3, 5), (5, 6), (6, 7), (3, 8), (8, 9), (9, 10), (4, 11),
        (11, 12), (12, 13), (4, 14), (14, 15), (15, 16),
    ),
    # AP-10K's sigmas as published with the dataset (mmpose ap10k.py; modified from COCO's)
    sigmas=(0.025, 0.025, 0.026, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107, 0.087,
            0.087, 0.089, 0.089),
    upper_body=(0, 1, 2, 3, 5, 6, 7, 8, 9, 10),
)

POSETRACK18 = KeypointSet(
    name="posetrack18",
    names=("nose", "head_bottom", "head_top") + _COCO_NAMES[3:],
    flip_pairs=((3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)),
    # COCO's limbs plus the head: nose-head_bottom, nose-head_top, head_bottom-shoulders (mmpose posetrack18.py)
    skeleton=_COCO_SKELETON[:12] + ((0, 1), (0, 2), (1, 5), (1, 6)),
    sigmas=_COCO_SIGMAS,  # PoseTrack18 is evaluated with COCO's sigmas (mmpose posetrack18.py)
    upper_body=tuple(range(11)),
)


def _wholebody() -> KeypointSet:
    """COCO-WholeBody: body 17 + feet 6 + face 68 + left hand 21 + right hand 21 = 133 keypoints."""
    feet = ("left_big_toe", "left_small_toe", "left_heel", "right_big_toe", "right_small_toe", "right_heel")
    face = tuple(f"face-{i}" for i in range(68))
    fingers = ("thumb", "forefinger", "middle_finger", "ring_finger", "pinky_finger")
    hand = lambda side: (f"{side}_hand_root",) + tuple(f"{side}_{f}{j}" for f in fingers for j in (1, 2, 3, 4))  # noqa: E731
    names = _COCO_NAMES + feet + face + hand("left") + hand("right")
    face_start, left_hand, right_hand = 23, 91, 112
    # the 68-point face's mirror map (jaw, brows, nose wings, eyes, outer and inner lips)
    face_mirror = ([(i, 16 - i) for i in range(8)] + [(17 + i, 26 - i) for i in range(5)] + [(31, 35), (32, 34)]
                   + [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]
                   + [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58), (60, 64), (61, 63), (65, 67)])
    flips = (_COCO_FLIPS + ((17, 20), (18, 21), (19, 22))
             + tuple((face_start + a, face_start + b) for a, b in face_mirror)
             + tuple((left_hand + i, right_hand + i) for i in range(21)))
    # COCO's limbs, ankle -> toes/heel, wrist -> each finger's chain (mmpose coco_wholebody.py)
    skeleton = list(_COCO_SKELETON)
    for ankle, first in ((15, 17), (16, 20)):
        skeleton += [(ankle, first), (ankle, first + 1), (ankle, first + 2)]
    for wrist, root in ((9, left_hand), (10, right_hand)):
        for finger in range(5):
            chain = [root + 1 + 4 * finger + j for j in range(4)]
            skeleton += [(wrist, chain[0]), (chain[0], chain[1]), (chain[1], chain[2]), (chain[2], chain[3])]
    sigmas = _COCO_SIGMAS + (
        0.068, 0.066, 0.066, 0.092, 0.094, 0.094, 0.042, 0.043, 0.044, 0.043, 0.040, 0.035, 0.031,
        0.025, 0.020, 0.023, 0.029, 0.032, 0.037, 0.038, 0.043, 0.041, 0.045,
        0.013, 0.012, 0.011, 0.011, 0.012, 0.012, 0.011, 0.011, 0.013, 0.015,
        0.009, 0.007, 0.007, 0.007, 0.012, 0.009, 0.008, 0.016, 0.010, 0.017,
        0.011, 0.009, 0.011, 0.009, 0.007, 0.013, 0.008, 0.011, 0.012, 0.010,
        0.034, 0.008, 0.008, 0.009, 0.008, 0.008, 0.007, 0.010, 0.008, 0.009,
        0.009, 0.009, 0.007, 0.007, 0.008, 0.011, 0.008, 0.008, 0.008, 0.01,
        0.008, 0.029, 0.022, 0.035, 0.037, 0.047, 0.026, 0.025, 0.024, 0.035,
        0.018, 0.024, 0.022, 0.026, 0.017, 0.021, 0.021, 0.032, 0.02, 0.019,
        0.022, 0.031, 0.029, 0.022, 0.035, 0.037, 0.047, 0.026, 0.025, 0.024,
        0.035, 0.018, 0.024, 0.022, 0.026, 0.017, 0.021, 0.021, 0.032, 0.02,
        0.019, 0.022, 0.031,
    )  # COCO-WholeBody's evaluation (myeval_wholebody.py), as in mmpose coco_wholebody.py
    upper = tuple(range(11)) + tuple(range(face_start, 133))
    return KeypointSet("coco_wholebody", names, flips, tuple(skeleton), sigmas, upper)


COCO_WHOLEBODY = _wholebody()

KEYPOINT_SETS: dict[str, KeypointSet] = {
    s.name: s for s in (COCO, AIC, MPII, CROWDPOSE, OCHUMAN, AP10K, COCO_WHOLEBODY, POSETRACK18)
}
# other spellings people use on the command line
_SET_ALIASES = {"wholebody": "coco_wholebody", "coco-wholebody": "coco_wholebody", "ap-10k": "ap10k",
                "posetrack": "posetrack18", "ai_challenger": "aic"}

# AIC limb joint i (0..11) is COCO keypoint AIC_TO_COCO[i]; head_top and neck have no COCO twin.
AIC_TO_COCO: tuple[int, ...] = (6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15)


def get_keypoint_set(name: str) -> KeypointSet:
    """A built-in set by name (also 'wholebody', 'ap-10k', 'posetrack')."""
    key = _SET_ALIASES.get(str(name).lower(), str(name).lower())
    try:
        return KEYPOINT_SETS[key]
    except KeyError:
        raise KeypointSetError(f"unknown keypoint set {name!r}; known: {sorted(KEYPOINT_SETS)}") from None


def builtin_keypoint_set(keypoint_set: KeypointSet) -> KeypointSet | None:
    """The built-in set equal to `keypoint_set` (name and layout), or None."""
    builtin = KEYPOINT_SETS.get(keypoint_set.name)
    return builtin if builtin is not None and builtin.same_layout(keypoint_set) else None


def aic_to_coco(keypoints_aic: np.ndarray) -> np.ndarray:
    """Map AIC keypoints [..., 14, 3] to COCO layout [..., 17, 3]; COCO-only joints get visibility 0."""
    keypoints_aic = np.asarray(keypoints_aic)
    out = np.zeros(keypoints_aic.shape[:-2] + (COCO.num_keypoints, keypoints_aic.shape[-1]), keypoints_aic.dtype)
    out[..., list(AIC_TO_COCO), :] = keypoints_aic[..., : len(AIC_TO_COCO), :]
    return out


# ----------------------------------------------------------------------------------------------------------
# sets read from files


def _match_builtin(names: Sequence[str], prefer: str | None = None) -> KeypointSet | None:
    canonical = [canonical_name(n) for n in names]
    candidates = list(KEYPOINT_SETS.values())
    if prefer is not None and prefer in KEYPOINT_SETS:
        candidates.insert(0, KEYPOINT_SETS[prefer])
    for candidate in candidates:
        if [canonical_name(n) for n in candidate.names] == canonical:
            return candidate
    return None


def _index_pairs(pairs: Any, names: Sequence[str], what: str, source: str, one_based: bool) -> tuple[tuple[int, int], ...]:
    """Pairs given as names or indices (1-based in COCO files, 0-based in YAML) -> 0-based index pairs."""
    if not isinstance(pairs, list | tuple):
        raise KeypointSetError(f"{source}: {what} must be a list of pairs, got {type(pairs).__name__}")
    lookup = {canonical_name(n): i for i, n in enumerate(names)}
    out = []
    for pair in pairs:
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise KeypointSetError(f"{source}: {what} entry {pair!r} is not a pair")
        indices = []
        for item in pair:
            if isinstance(item, str):
                if canonical_name(item) not in lookup:
                    raise KeypointSetError(f"{source}: {what} entry {pair!r} names {item!r}, which is not a keypoint")
                indices.append(lookup[canonical_name(item)])
            elif isinstance(item, int) and not isinstance(item, bool):
                index = item - 1 if one_based else item
                if not 0 <= index < len(names):
                    base = "1-based" if one_based else "0-based"
                    raise KeypointSetError(f"{source}: {what} entry {pair!r} is outside the {len(names)} keypoints "
                                           f"({base} indices)")
                indices.append(index)
            else:
                raise KeypointSetError(f"{source}: {what} entry {pair!r} holds {item!r}, not a name or an index")
        out.append((indices[0], indices[1]))
    return tuple(out)


def _indices(items: Sequence[int | str], names: Sequence[str], what: str, source: str) -> tuple[int, ...]:
    """Keypoint names or 0-based indices -> 0-based indices."""
    return tuple(a for a, _ in _index_pairs([(item, item) for item in items], names, what, source, one_based=False))


def keypoint_set_from_category(category: dict[str, Any], name: str | None = None, source: str = "category",
                               sigmas: Sequence[float] | None = None,
                               flip_pairs: Sequence[Sequence[int | str]] | None = None,
                               upper_body: Sequence[int | str] | None = None,
                               skeleton: Sequence[Sequence[int | str]] | None = None) -> KeypointSet:
    """The keypoint set a COCO category describes (`keypoints` names, 1-based `skeleton`).

    Names equal to a built-in set's (compared case- and spacing-insensitively) give that set (renamed
    to `name` if given), unless something is overridden. Otherwise: flip pairs from left/right names,
    upper body from names, and `DEFAULT_SIGMA` for every keypoint with a warning when `sigmas` is not
    given. Overrides take names or 0-based indices. A skeleton that refers to keypoints the category
    does not have is an error naming `source`.
    """
    names = category.get("keypoints") if isinstance(category, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise KeypointSetError(f"{source}: the category has no 'keypoints' list of names")
    overridden = any(v is not None for v in (sigmas, flip_pairs, upper_body, skeleton))
    builtin = _match_builtin(names, prefer=name)
    if builtin is not None and not overridden:
        return builtin if name is None or name == builtin.name else builtin.renamed(name)
    set_name = name or str(category.get("name") or Path(source).stem)
    if skeleton is not None:
        limbs = _index_pairs(skeleton, names, "skeleton", source, one_based=False)
    elif builtin is not None:
        limbs = builtin.skeleton  # files copy COCO's skeleton into other layouts (CrowdPose's does)
    else:
        limbs = _index_pairs(category.get("skeleton") or [], names, "skeleton", source, one_based=True)
    if flip_pairs is not None:
        flips = _index_pairs(flip_pairs, names, "flip_pairs", source, one_based=False)
    else:
        flips = builtin.flip_pairs if builtin is not None else infer_flip_pairs(names)
    if upper_body is not None:
        upper = _indices(upper_body, names, "upper_body", source)
    else:
        upper = builtin.upper_body if builtin is not None else infer_upper_body(names)
    guessed = sigmas is None and builtin is None
    if sigmas is None:
        sigmas = builtin.sigmas if builtin is not None else (DEFAULT_SIGMA,) * len(names)
        if guessed:
            logger.warning("%s: no OKS sigmas for keypoint set %r; using the default %.3f for all %d keypoints "
                           "(give them in a keypoint-set YAML for meaningful AP)", source, set_name, DEFAULT_SIGMA,
                           len(names))
    try:
        return KeypointSet(set_name, tuple(names), flips, limbs, tuple(sigmas), upper, sigmas_guessed=guessed)
    except KeypointSetError as error:
        raise KeypointSetError(f"{source}: {error}") from None


def keypoint_set_from_coco(document: dict[str, Any], name: str | None = None, source: str = "COCO document",
                           **overrides: Any) -> KeypointSet:
    """The keypoint set of a COCO-format document: its categories with keypoints must all agree."""
    categories = document.get("categories") if isinstance(document, dict) else None
    if not isinstance(categories, list):
        raise KeypointSetError(f"{source}: not a COCO document (no 'categories' list)")
    with_keypoints = [c for c in categories if isinstance(c, dict) and c.get("keypoints")]
    if not with_keypoints:
        raise KeypointSetError(f"{source}: no category lists 'keypoints'")
    first = with_keypoints[0]
    for other in with_keypoints[1:]:
        if other["keypoints"] != first["keypoints"]:
            raise KeypointSetError(f"{source}: categories {first.get('name')!r} and {other.get('name')!r} list "
                                   "different keypoints; one keypoint set per file is supported")
    return keypoint_set_from_category(first, name=name, source=source, **overrides)


def keypoint_set_from_coco_file(path: str | Path, name: str | None = None, **overrides: Any) -> KeypointSet:
    path = Path(path)
    try:
        document = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise KeypointSetError(f"COCO file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise KeypointSetError(f"cannot read COCO file {path}: {' '.join(str(error).split())}") from None
    return keypoint_set_from_coco(document, name=name, source=str(path), **overrides)


class KeypointSetYaml(BaseModel):
    """A keypoint-set YAML file. Names come from `keypoints` or from `coco_file`'s category.

    Pairs and upper-body entries are keypoint names or 0-based indices; `sigmas` is a list (one per
    keypoint) or a {name: sigma} map; anything left out is inferred from names (sigmas: the default,
    with a warning).
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    keypoints: list[str] | None = None
    coco_file: str | None = None  # relative to the YAML file
    skeleton: list[tuple[int | str, int | str]] | None = None
    flip_pairs: list[tuple[int | str, int | str]] | None = None
    sigmas: list[float] | dict[str, float] | None = None
    upper_body: list[int | str] | None = None


def load_keypoint_set_yaml(path: str | Path) -> KeypointSet:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise KeypointSetError(f"keypoint-set YAML not found: {path}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise KeypointSetError(f"cannot read keypoint-set YAML {path}: {' '.join(str(error).split())}") from None
    try:
        spec = KeypointSetYaml.model_validate(raw)
    except ValidationError as error:
        raise KeypointSetError(f"{path}: {' '.join(str(error).split())}") from None
    if (spec.keypoints is None) == (spec.coco_file is None):
        raise KeypointSetError(f"{path}: give exactly one of 'keypoints' (names) or 'coco_file'")
    if spec.coco_file is not None:
        coco_path = path.parent / spec.coco_file
        try:
            document = json.loads(coco_path.read_bytes())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise KeypointSetError(f"{path}: cannot read coco_file {coco_path}: {' '.join(str(error).split())}") from None
        categories = [c for c in document.get("categories", []) if isinstance(c, dict) and c.get("keypoints")] \
            if isinstance(document, dict) else []
        if not categories:
            raise KeypointSetError(f"{path}: coco_file {coco_path} has no category with 'keypoints'")
        category = dict(categories[0])
    else:
        category = {"name": spec.name, "keypoints": list(spec.keypoints or []), "skeleton": []}
    names = category["keypoints"]
    sigmas: Sequence[float] | None
    if isinstance(spec.sigmas, dict):
        lookup = {canonical_name(k): v for k, v in spec.sigmas.items()}
        missing = [n for n in names if canonical_name(n) not in lookup]
        unknown = sorted(set(lookup) - {canonical_name(n) for n in names})
        if missing or unknown:
            raise KeypointSetError(f"{path}: the sigmas map lacks {missing} and names unknown keypoints {unknown}")
        sigmas = [lookup[canonical_name(n)] for n in names]
    else:
        sigmas = spec.sigmas
    if sigmas is not None and len(sigmas) != len(names):
        raise KeypointSetError(f"{path}: {len(sigmas)} sigmas for {len(names)} keypoints")
    return keypoint_set_from_category(category, name=spec.name, source=str(path), sigmas=sigmas,
                                      flip_pairs=spec.flip_pairs, upper_body=spec.upper_body, skeleton=spec.skeleton)


def resolve_keypoint_set(spec: str | Path | KeypointSet) -> KeypointSet:
    """'SET name | path to a COCO json or keypoint-set YAML' -> KeypointSet."""
    if isinstance(spec, KeypointSet):
        return spec
    text = str(spec)
    suffix = Path(text).suffix.lower()
    if suffix == ".json":
        return keypoint_set_from_coco_file(text)
    if suffix in (".yaml", ".yml"):
        return load_keypoint_set_yaml(text)
    try:
        return get_keypoint_set(text)
    except KeypointSetError:
        raise KeypointSetError(f"keypoint set {text!r} is neither a built-in set ({', '.join(sorted(KEYPOINT_SETS))}) "
                               "nor a path to a COCO .json or a keypoint-set .yaml") from None


def keypoint_set_names(sets: Iterable[KeypointSet]) -> list[str]:
    return [s.name for s in sets]
