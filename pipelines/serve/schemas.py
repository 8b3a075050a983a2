"""Request and response bodies of the pose HTTP API (they also make the OpenAPI docs at /docs).

Coordinates are image pixels with pixel *centres* at integer positions (the convention of
`vitpose_core.geometry` and COCO). Boxes are [x, y, w, h] with (x, y) the top-left corner.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

Box = tuple[float, float, float, float]


class PoseRequestJSON(BaseModel):
    """`POST /v1/pose` with `Content-Type: application/json`."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(..., description="the encoded image file (JPEG, PNG, WebP or BMP) as base64; "
                                        "a `data:image/...;base64,` prefix is accepted")
    boxes: list[Box] | None = Field(None, description="person boxes [x, y, w, h] in pixels; "
                                                      "null or absent: the whole image (or the detector's boxes)")


class Person(BaseModel):
    box: Box = Field(..., description="the person box [x, y, w, h] the keypoints were predicted in")
    keypoints: list[tuple[float, float, float]] = Field(..., description="K keypoints as (x, y, score) "
                                                                         "in image pixels")


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
