"""The ViTPose Serve application: a thin FastAPI ingress in front of a batched model deployment.

    HTTP -> Serve proxy -> PoseIngress (validate, decode, crop)  -> PoseModel (@serve.batch over crops,
                             |  box-free requests                      forward pass, heatmap decode)
                             +-> detector deployment (optional, see detector.py)

Build it with `build_app(args)`, the Serve application builder: `serve run` / `serve deploy` a config
with `import_path: pipelines.serve.app:build_app` and the `ServeConfig` keys under `args:`, or run
`vitpose serve --config pipelines/configs/serve.yaml`. Importing this module does no work beyond
defining the routes; the model is loaded in the model replicas' constructors.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines.config import build_config, load_yaml
from pipelines.serve.config import ServeConfig
from pipelines.serve.detector import WholeImageDetector, boxes_from_detections, import_detector_class
from pipelines.serve.inputs import (
    MAX_FORM_FIELD_BYTES,
    RAW_IMAGE_TYPES,
    RequestError,
    decode_image,
    media_type,
    parse_boxes_json,
    parse_json_request,
    read_body,
    validate_boxes,
)
from pipelines.serve.model import InputSizeChanged, PoseModel
from pipelines.serve.schemas import (
    COCO_CATEGORY_PERSON,
    CocoResult,
    ErrorResponse,
    Health,
    ModelInfo,
    PoseRequestJSON,
    PoseResponse,
)

logger = logging.getLogger("ray.serve")
# how long a request retries while replicas are on two model versions (a promotion in progress)
PROMOTION_RETRY_S = 15.0

api = FastAPI(title="ViTPose on Ray", version="1", description="Top-down human pose estimation. "
              "POST an image (and optionally person boxes) to /v1/pose; errors are JSON {\"error\": ...}.")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in {
        400: "malformed JSON, multipart or boxes", 413: "body, image pixels or image side over the limit",
        415: "content type or image format not accepted", 422: "invalid image or boxes",
        503: "overloaded or no model replica: retry after Retry-After seconds", 504: "request timed out",
    }.items()
}
POSE_REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": PoseRequestJSON.model_json_schema()},
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "format": "binary"},
        "boxes": {"type": "string", "description": "JSON list of [x, y, w, h]"}}}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"},
                   "description": "raw image body (also image/png, image/webp, image/bmp); boxes in ?boxes="},
}}, "parameters": [
    {"name": "format", "in": "query", "required": False, "schema": {"type": "string", "enum": ["default", "coco"]},
     "description": "`coco`: answer a COCO keypoint results list [{image_id, category_id, keypoints, score}]"},
    {"name": "image_id", "in": "query", "required": False,
     "schema": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
     "description": "the image_id of the COCO results records (default 0)"},
], "responses": {"200": {"description": "keypoints per person; a COCO results list with ?format=coco",
                         "content": {"application/json": {"schema": {"anyOf": [
                             {"$ref": "#/components/schemas/PoseResponse"},
                             {"type": "array", "items": CocoResult.model_json_schema()}]}}}}}}


def error_response(status: int, message: str, retry_after_s: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@api.exception_handler(RequestError)
async def _request_error(request: Request, error: RequestError) -> JSONResponse:
    return error_response(error.status, error.message, error.retry_after_s)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    return error_response(error.status_code, str(error.detail))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0] if error.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return error_response(422, f"invalid request: {where}: {first.get('msg', 'validation failed')}")


@api.exception_handler(Exception)
async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s", request.url.path)
    return error_response(500, "internal server error")


def response_format(query: Any) -> tuple[str, int]:
    """(`default` | `coco`, image_id) from the query string; a 422 naming the bad parameter otherwise."""
    fmt = query.get("format", "default")
    if fmt not in ("default", "coco"):
        raise RequestError(422, f"format must be 'default' or 'coco', got {fmt[:40]!r}")
    raw_id = query.get("image_id")
    if raw_id is None:
        return fmt, 0
    if fmt != "coco":
        raise RequestError(422, "image_id is only used with format=coco")
    if not (raw_id.isascii() and raw_id.isdigit()) or len(raw_id) > 19 or int(raw_id) > 2**63 - 1:
        raise RequestError(422, f"image_id must be an integer in [0, 2^63), got {raw_id[:40]!r}")
    return fmt, int(raw_id)


def detection_scores(detections: Any, max_boxes: int) -> list[float]:
    """The box scores in the order `boxes_from_detections` returns its boxes (1.0 for unscored boxes)."""
    array = np.asarray(detections, dtype=np.float64)
    if array.size == 0:
        return []
    array = array.reshape(len(array), -1)
    if array.shape[1] != 5:
        return [1.0] * min(len(array), max_boxes)
    return (-np.sort(-array[:, 4], kind="stable"))[:max_boxes].tolist()


def persons_json(boxes: np.ndarray, box_scores: list[float], keypoints: list[np.ndarray]) -> list[dict[str, Any]]:
    """The response's persons: box, box score, keypoints (x, y, score), keypoint scores, person score."""
    from vitpose_core.evaluation import instance_score

    persons = []
    for box, box_score, person in zip(boxes, box_scores, keypoints, strict=True):
        persons.append({"box": box.tolist(), "box_score": float(box_score), "keypoints": person.tolist(),
                        "keypoint_scores": person[:, 2].tolist(),
                        "score": instance_score(person[:, 2], box_score)})
    return persons


def coco_results(persons: list[dict[str, Any]], image_id: int) -> list[dict[str, Any]]:
    """Persons -> COCO keypoint results records (keypoints flat [x1, y1, s1, ...], s = keypoint score)."""
    return [{"image_id": image_id, "category_id": COCO_CATEGORY_PERSON,
             "keypoints": [value for point in person["keypoints"] for value in point], "score": person["score"]}
            for person in persons]


def _is_unavailable(error: BaseException) -> bool:
    """A model replica died, was rejected by backpressure, or is not there yet: the client should retry."""
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    return isinstance(error, BackPressureError | DeploymentUnavailableError | ReplicaUnavailableError
                      | RayActorError | ActorUnavailableError)


@serve.deployment(name="PoseIngress")
@serve.ingress(api)
class PoseIngress:
    """Validates and decodes requests, cuts the crops, and fans them out to the model deployment."""

    def __init__(self, model: DeploymentHandle, detector: DeploymentHandle | None, config: dict[str, Any]) -> None:
        self.config = ServeConfig.model_validate(config)
        self.model = model
        self.detector = detector
        self.whole_image = WholeImageDetector()
        self._model_info: dict[str, Any] | None = None

    async def model_info(self, fresh: bool = False) -> dict[str, Any]:
        """The model's identity and input size from a model replica, cached until a response shows
        another version (a promotion) or `fresh` asks a replica now."""
        if self._model_info is None or fresh:
            try:
                self._model_info = await self.model.info.remote()
            except Exception as error:
                if _is_unavailable(error):
                    raise RequestError(503, "model is not available yet", self.config.retry_after_s) from None
                raise
        return self._model_info

    @api.get("/healthz", response_model=Health, responses=ERROR_RESPONSES)
    async def healthz(self) -> Health:
        """200 once a model replica answers; 503 while none does."""
        info = await self.model_info(fresh=True)
        return Health(status="ok", model=info["name"], version=info["version"])

    @api.get("/v1/model", response_model=ModelInfo, responses=ERROR_RESPONSES)
    async def model_description(self) -> ModelInfo:
        """The served model as a replica reports it now: name, version, source, keypoints, input size,
        dtype, flip test, and the alias it watches for promotions. During a promotion, replicas that
        have swapped report the new version and the others the old one."""
        info = await self.model_info(fresh=True)
        return ModelInfo(**{key: value for key, value in info.items() if key in ModelInfo.model_fields})

    @api.post("/v1/pose", response_model=PoseResponse, responses=ERROR_RESPONSES, openapi_extra=POSE_REQUEST_BODY)
    async def pose(self, request: Request) -> JSONResponse:
        """Keypoints for each person box in the image (no boxes: the detector's, or the whole image)."""
        try:
            async with asyncio.timeout(self.config.request_timeout_s):
                return await self._pose(request)
        except TimeoutError:
            raise RequestError(504, f"request took longer than {self.config.request_timeout_s} s") from None

    async def _pose(self, request: Request) -> JSONResponse:
        fmt, image_id = response_format(request.query_params)
        image_bytes, raw_boxes = await self._read_request(request)
        info = await self.model_info()
        limits = self.config.limits
        # decoding and warping release the GIL: run them off the event loop so other requests proceed
        image = await asyncio.to_thread(decode_image, image_bytes, limits)
        height, width = image.shape[:2]
        box_scores = None
        if raw_boxes is None:
            raw_boxes, box_scores = await self._detect(image)
        boxes = validate_boxes(raw_boxes, (width, height), limits)
        if box_scores is None:
            box_scores = [1.0] * len(boxes)  # client boxes carry no score: the person score is the keypoints'
        keypoints, identity = await self._keypoints(image, boxes, info)
        # a plain dict: the response is built from our own numbers, re-validating them costs CPU per request
        persons = persons_json(boxes, box_scores, keypoints)
        if fmt == "coco":
            return JSONResponse(coco_results(persons, image_id),
                                headers={"X-Model-Version": identity["version"], "X-Model-Name": identity["name"]})
        return JSONResponse({"model": identity["name"], "version": identity["version"],
                             "image_size": [width, height], "persons": persons})

    async def _read_request(self, request: Request) -> tuple[bytes, Any]:
        """(encoded image, raw boxes or None) from a JSON, multipart or raw-image body."""
        kind = media_type(request.headers.get("content-type"))
        if kind not in {"application/json", "multipart/form-data"} | RAW_IMAGE_TYPES:
            raise RequestError(415, f"content type {kind or '(none)'!r} is not accepted; send application/json, "
                                    "multipart/form-data or an image/* body")
        body = await read_body(request.stream(), request.headers.get("content-length"),
                               self.config.limits.max_body_bytes)
        if kind == "application/json":
            return parse_json_request(body)
        if kind == "multipart/form-data":
            return await self._read_multipart(request, body)
        return body, parse_boxes_json(request.query_params.get("boxes"))

    async def _read_multipart(self, request: Request, body: bytes) -> tuple[bytes, Any]:
        async def replay() -> dict[str, Any]:  # the body is already read (and size-checked): parse it from memory
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=4,
                                                               max_part_size=MAX_FORM_FIELD_BYTES)
        except Exception:  # MultiPartException / HTTPException(400) / bad boundary: all malformed input
            raise RequestError(400, "malformed multipart/form-data body") from None
        try:
            image = form.get("image")
            if image is None or isinstance(image, str):
                raise RequestError(422, "multipart body needs a file part named 'image'")
            boxes_field = form.get("boxes")
            boxes = boxes_field if boxes_field is not None else request.query_params.get("boxes")
            if boxes is not None and not isinstance(boxes, str):
                raise RequestError(422, "the 'boxes' part must be a JSON string, not a file")
            return await image.read(), parse_boxes_json(boxes)
        finally:
            await form.close()

    async def _detect(self, image: np.ndarray) -> tuple[list[list[float]], list[float]]:
        """(boxes [x, y, w, h], box scores) of the detector (or the whole image), best first."""
        if self.detector is None:
            detections = self.whole_image.detect(image)
        else:
            try:
                detections = await self.detector.detect.remote(image)
            except Exception as error:
                if _is_unavailable(error):
                    raise RequestError(503, "detector unavailable", self.config.retry_after_s) from None
                raise
        max_boxes = self.config.limits.max_boxes
        return boxes_from_detections(detections, max_boxes), detection_scores(detections, max_boxes)

    async def _keypoints(self, image: np.ndarray, boxes: np.ndarray, info: dict[str, Any]
                         ) -> tuple[list[np.ndarray], dict[str, str]]:
        """Crops -> model deployment in calls of <= max_batch_size crops -> (keypoints [K, 3] per box,
        the {name, version} that computed them).

        During a promotion a request can meet a replica whose model has another input size than the
        crops were cut for, or (over several calls) replicas on two versions: it is cut again with
        the model info as it is now, so every response comes from one version. Replicas pick up a new
        version each on its own watch tick, so two versions can coexist for seconds on a loaded node: the
        request keeps retrying for up to PROMOTION_RETRY_S (with 3 quick tries, 2 of 165 requests got 503
        under load) before it answers 503 + Retry-After.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PROMOTION_RETRY_S
        attempt = 0
        while True:
            results = await self._keypoints_once(image, boxes, info)
            if results is not None:
                identities = {(result["name"], result["version"]) for result in results}
                if len(identities) <= 1:
                    if results and results[0]["version"] != info["version"]:
                        self._model_info = None  # a promotion: re-read input size and identity next time
                    keypoints = [person for result in results for person in result["keypoints"]]
                    identity = {"name": results[0]["name"], "version": results[0]["version"]} if results \
                        else {"name": info["name"], "version": info["version"]}
                    return keypoints, identity
            if loop.time() >= deadline:
                break
            await asyncio.sleep(min(0.05 * 2 ** attempt, 1.0))  # let the other replica finish its swap
            attempt += 1
            info = await self.model_info(fresh=True)
        raise RequestError(503, "the model is being replaced, retry", self.config.retry_after_s)

    async def _keypoints_once(self, image: np.ndarray, boxes: np.ndarray, info: dict[str, Any]
                              ) -> list[dict[str, Any]] | None:
        """The model's answers for each call, or None when the crops no longer fit the served model."""
        from vitpose_core.inference import prepare_crops

        if len(boxes) == 0:
            return []
        max_batch_size = int(info["max_batch_size"])
        crops, crop_to_image = await asyncio.to_thread(prepare_crops, image, boxes, tuple(info["input_size"]))
        crops_np = crops.numpy()
        calls = [self.model.predict.remote(crops_np[start:start + max_batch_size],
                                           crop_to_image[start:start + max_batch_size])
                 for start in range(0, len(crops_np), max_batch_size)]
        try:
            return list(await asyncio.gather(*calls))
        except InputSizeChanged:
            return None
        except Exception as error:
            if _is_unavailable(error):
                raise RequestError(503, "model replica unavailable, retry", self.config.retry_after_s) from None
            raise


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def load_serve_config(args: dict[str, Any] | None = None) -> ServeConfig:
    """`args` of a Serve config -> ServeConfig. `config_file` (a YAML path) is read first, the other keys
    are merged over it, then `overrides` (["batching.max_batch_size=8", ...]) are applied."""
    args = dict(args or {})
    config_file = args.pop("config_file", None)
    overrides = args.pop("overrides", None)
    data = _merge(load_yaml(config_file) if config_file else {}, args)
    return build_config(ServeConfig, data, overrides, source=config_file or "build_app args")


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The Serve application builder (`import_path: pipelines.serve.app:build_app`)."""
    return bind_app(load_serve_config(args))


def bind_app(config: ServeConfig) -> serve.Application:
    """Bind the deployments with the replica, batching and backpressure options from `config`."""
    config_json = config.model_dump(mode="json")
    resources, scaling = config.resources, config.autoscaling
    model_options: dict[str, Any] = dict(
        # room for one running batch plus one filling: below max_batch_size the batch can never fill (#43288)
        max_ongoing_requests=2 * config.batching.max_batch_size,
        ray_actor_options={"num_cpus": resources.model_num_cpus, "num_gpus": resources.model_num_gpus,
                           **({"resources": resources.model_resources} if resources.model_resources else {})},
    )
    if scaling.min_replicas == scaling.max_replicas:
        model_options["num_replicas"] = scaling.min_replicas
    else:
        model_options["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
            "initial_replicas": scaling.initial_replicas, "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s, "downscale_delay_s": scaling.downscale_delay_s,
            "look_back_period_s": scaling.look_back_period_s,
        }
    # the model source is also the deployment's user_config: changing it in `serve deploy` or a RayService
    # reloads running replicas in place (PoseModel.reconfigure) instead of replacing them
    model_options["user_config"] = {"model": config.model.model_dump(mode="json")}
    model = PoseModel.options(**model_options).bind(config_json)

    detector = None
    if config.detector.import_path:
        detector_cls = import_detector_class(config.detector.import_path)
        detector = serve.deployment(detector_cls, name="PersonDetector").options(
            num_replicas=config.detector.num_replicas,
            ray_actor_options={"num_cpus": config.detector.num_cpus, "num_gpus": config.detector.num_gpus},
        ).bind(**config.detector.init_kwargs)

    return PoseIngress.options(
        num_replicas=resources.ingress_replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        # the proxy answers at once when the ingress queue is full: no hang, a retry hint instead
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=config.retry_after_s),
        ray_actor_options={"num_cpus": resources.ingress_num_cpus},
    ).bind(model, detector, config_json)
