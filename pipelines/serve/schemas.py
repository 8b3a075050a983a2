"""Request and response bodies of the pose HTTP API (they also make the OpenAPI docs at /docs).

Coordinates are image pixels with pixel *centres* at integer positions (the convention of
`vitpose_core.geometry` and COCO). Boxes are [x, y, w, h] with (x, y) the top-left corner.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

Box = tuple[float, float, float, float]
COCO_CATEGORY_PERSON = 1


class PoseRequestJSON(BaseModel):
    """`POST /v1/pose` with `Content-Type: application/json`."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(..., description="the encoded image file (JPEG, PNG, WebP or BMP) as base64; "
                                        "a `data:image/...;base64,` prefix is accepted")
    boxes: list[Box] | None = Field(None, description="person boxes [x, y, w, h] in pixels; "
                                                      "null or absent: the whole image (or the detector's boxes)")


class Person(BaseModel):
    box: Box = Field(..., description="the person box [x, y, w, h] the keypoints were predicted in")
    box_score: float = Field(..., description="the detector's score of the box; 1.0 for boxes the client sent")
    keypoints: list[tuple[float, float, float]] = Field(..., description="K keypoints as (x, y, score) "
                                                                         "in image pixels")
    keypoint_scores: list[float] = Field(..., description="the K keypoint scores (heatmap maxima), as in keypoints")
    score: float = Field(..., description="person score as mmpose rescores top-down results: box_score x the "
                                          "mean of the keypoint scores above 0.2 (0 when none is)")


class CocoResult(BaseModel):
    """One record of the COCO keypoint results format (`POST /v1/pose?format=coco`)."""

    image_id: int = Field(..., description="the request's ?image_id= (default 0)")
    category_id: int = Field(COCO_CATEGORY_PERSON, description="1: person")
    keypoints: list[float] = Field(..., description="[x1, y1, s1, x2, y2, s2, ...]: K (x, y, keypoint score)")
    score: float = Field(..., description="the person score (see Person.score)")


class ModelInfo(BaseModel):
    name: str
    version: str
    source: str = Field(..., description="the URI or path the model was loaded from")
    variant: str
    keypoint_set: str
    keypoint_names: list[str]
    input_size: tuple[int, int] = Field(..., description="crop size (W, H) fed to the model")
    dtype: str
    flip_test: bool
    watching: str | None = Field(None, description="the registry alias the replicas poll for promotions, if any")
    watch_interval_s: float | None = None
    last_alias_check: float | None = Field(None, description="unix time of the replica's last alias poll")
    promotion_error: str | None = Field(None, description="why the version the alias points at could not be "
                                                          "loaded (the previous version is still served)")


class PoseResponse(BaseModel):
    model: str
    version: str
    image_size: tuple[int, int] = Field(..., description="(width, height) of the decoded image")
    persons: list[Person]


class ErrorResponse(BaseModel):
    error: str


class Health(BaseModel):
    status: str
    model: str
    version: str
