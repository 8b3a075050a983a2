"""Issue #18 probes: what `vitpose` does with hostile input, in any checkout of this repository.

    python bench/bench_hostile_inputs.py probe --tree /path/to/checkout --label after [--only ID,...]
    python bench/bench_hostile_inputs.py table --before B.json --start S.json --after A.json --out X.md

`probe` runs every case as its own `vitpose` process (the checkout's code first on PYTHONPATH, this
venv's packages), with a wall-clock limit and a memory cap (the process is killed above 2.5 GB RSS,
polled every 50 ms), and records exit code, seconds, peak RSS, the one error line (or the last line of
a traceback) and what happened to the files and numbers the case is about (AP, files left in the
output directory, bare NaN in the JSON written, Ray processes left after a signal). `table` joins the
runs into the Markdown before/after table of bench/results/hostile_inputs.md.

The S3 outage cases use a real moto server that held the data and was then stopped (the endpoint is
dead); the bad-credentials case a moto server process that checks credentials.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
COCO = SHARED / "coco"
MEMORY_CAP_KB = 2_500 * 1024
TINY_SHARD = ["--set", "shard.synthetic.train_images=16", "--set", "shard.synthetic.val_images=2",
              "--set", "shard.synthetic.max_people=1"]

CASES: list[tuple[str, str, Callable]] = []


def case(case_id: str, what: str):
    def register(fn: Callable) -> Callable:
        CASES.append((case_id, what, fn))
        return fn
    return register


# --- running one command -------------------------------------------------------------------------------

class Context:
    def __init__(self, tree: Path, tmp: Path):
        self.tree, self.tmp = tree, tmp
        self.last_stderr = ""

    def file(self, name: str, text: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    def vitpose(self, *argv, timeout: float = 60, env: dict | None = None, stop_after: float | None = None,
                stop_signal: int = signal.SIGTERM, ray_ready: bool = False) -> dict:
        """Run `vitpose argv` from the checkout; kill it past `timeout` or MEMORY_CAP_KB. With `stop_after`,
        send `stop_signal` that many seconds after start (or after its Ray cluster is up, with `ray_ready`)."""
        ray_tmp = Path(tempfile.mkdtemp(prefix="h18ray-", dir="/tmp"))  # Ray's socket paths stay short
        full_env = {**os.environ, "PYTHONPATH": str(self.tree), "RAY_AUTH_MODE": "disabled",
                    "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env.pop("RAY_ADDRESS", None)
        command = [sys.executable, "-c", "import sys; from pipelines.cli import main; sys.exit(main())",
                   *map(str, argv)]
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=self.tmp, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        outputs: dict[str, str] = {}
        import threading

        readers = [threading.Thread(target=lambda n=n, s=s: outputs.__setitem__(n, s.read()), daemon=True)
                   for n, s in (("out", proc.stdout), ("err", proc.stderr))]
        for reader in readers:
            reader.start()
        peak_kb, killed, signalled, ray_up_at = 0, "", None, None
        while proc.poll() is None:
            elapsed = time.perf_counter() - start
            peak_kb = max(peak_kb, rss_kb(proc.pid))
            if ray_ready and ray_up_at is None and ray_processes(ray_tmp):
                ray_up_at = elapsed
            if stop_after is not None and signalled is None:
                due = (ray_up_at + stop_after) if ray_ready and ray_up_at is not None else (
                    None if ray_ready else stop_after)
                if due is not None and elapsed >= due:
                    proc.send_signal(stop_signal)
                    signalled = round(elapsed, 1)
            if peak_kb > MEMORY_CAP_KB:
                killed = f"killed at {peak_kb // 1024} MB RSS after {elapsed:.1f} s"
            elif elapsed > timeout:
                killed = f"still running after {timeout:.0f} s, killed"
            if killed:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait()
        seconds = time.perf_counter() - start
        for reader in readers:
            reader.join(timeout=10)
        left = []
        if stop_after is not None:  # what of its Ray cluster survived the signal (given 20 s to go)
            deadline = time.time() + 20
            while ray_processes(ray_tmp) and time.time() < deadline:
                time.sleep(0.5)
            left = ray_processes(ray_tmp)
        for pid, _ in ray_processes(ray_tmp):  # our own processes only: those of this probe's Ray temp dir
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
        self.last_stderr = outputs.get("err", "")[-3000:].replace(str(self.tmp), "$TMP")
        return {"code": None if killed else proc.returncode, "seconds": round(seconds, 1),
                "peak_mb": round(peak_kb / 1024), "killed": killed, "stdout": outputs.get("out", ""),
                "stderr": outputs.get("err", ""), "signalled_at": signalled, "ray_left": len(left),
                "ray_left_names": sorted({name for _, name in left})}


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def ray_processes(temp_root: Path) -> list[tuple[int, str]]:
    """(pid, program) of live processes whose command line names `temp_root` (a Ray cluster's temp dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(str(temp_root).encode() in a for a in argv):
            found.append((int(proc.name), Path(argv[0].decode(errors="replace")).name))
    return found


def summary(run: dict, tmp: Path) -> str:
    """`exit N, S s, M MB: message` with the one error line or the traceback's last line."""
    err = run["stderr"].replace(str(tmp), "$TMP")
    lines = [line.strip() for line in err.splitlines() if line.strip()]
    message = ""
    if "Traceback (most recent call last)" in err:
        last = next((line for line in reversed(lines) if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line)),
                    lines[-1] if lines else "")
        message = f"traceback: {last}"
    else:
        at = [i for i, line in enumerate(lines) if ": error: " in line or "stopped by" in line]
        message = lines[at[-1]] if at else ""
        if message.endswith(":"):  # a config's list of bad keys follows, one per line
            message += " " + "; ".join(lines[at[-1] + 1:at[-1] + 4])
    message = message.replace("|", "\\|")
    if len(message) > 230:
        message = message[:227] + "..."
    status = run["killed"] or f"exit {run['code']}"
    return f"{status}, {run['seconds']} s, {run['peak_mb']} MB" + (f": {message}" if message else "")


def ap_of(run: dict) -> str:
    match = re.search(r'"AP": ([-\d.eE+naNI]+)', run["stdout"])
    return f"AP {float(match.group(1)):.4f}" if match else ""


# --- shared inputs -------------------------------------------------------------------------------------

def png_bomb(path: Path, side: int = 30000) -> Path:
    """A valid 1-bit greyscale PNG of side x side pixels, all zero: ~110 KB on disk, 2.7 GB as RGB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    compressed = b"".join(compressor.compress(row * 1000) for _ in range(side // 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", compressed)
                     + chunk(b"IEND", b""))
    return path


def checkpoint(ctx: Context, name: str, nan: bool = False) -> Path:
    """A vitpose-tiny checkpoint written by the checkout's own code (its format), NaN weights if asked."""
    path = ctx.tmp / name
    if not path.exists():
        script = ("import math, sys, torch\nfrom vitpose_core import build_model, save_checkpoint\n"
                  "torch.manual_seed(0)\nmodel = build_model('vitpose-tiny')\n"
                  + ("with torch.no_grad():\n    model.keypoint_head.final_layer.weight.fill_(math.nan)\n" if nan else "")
                  + f"save_checkpoint(model, {str(path)!r})\n")
        subprocess.run([sys.executable, "-c", script], cwd=ctx.tmp, env={**os.environ, "PYTHONPATH": str(ctx.tree)},
                       check=True, capture_output=True)
    return path


def example_predictions() -> list[dict]:
    return json.loads((COCO / "example_coco_preds.json").read_text())


def write_json(ctx: Context, name: str, value, allow_nan: bool = False) -> Path:
    return ctx.file(name, json.dumps(value, allow_nan=allow_nan))


def eval_predictions(ctx: Context, predictions: Path, annotations: Path = COCO / "test_coco.json") -> str:
    run = ctx.vitpose("eval", "--annotations", annotations, "--predictions", predictions)
    return " ".join(filter(None, [summary(run, ctx.tmp), ap_of(run)]))


def stopped_moto(ctx: Context) -> str:
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket="hostile")
    for name in ("test_coco.json", "000000000785.jpg", "000000040083.jpg", "000000196141.jpg", "000000197388.jpg"):
        client.upload_file(str(COCO / name), "hostile", f"raw/coco/{name}")
    server.stop()
    return endpoint


def s3_env(endpoint: str) -> dict:
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint, "VITPOSE_S3_MAX_ATTEMPTS": "2"}


def shard_outcome(ctx: Context, run: dict, out: Path) -> str:
    manifest = out / "manifest.json"
    if not manifest.exists():
        return summary(run, ctx.tmp) + "; no manifest"
    data = json.loads(manifest.read_text())
    totals = data.get("totals", {})
    reasons: dict[str, int] = {}
    for skip in [*data.get("skipped", []), *data.get("skipped_files", [])]:
        reasons[skip["reason"]] = reasons.get(skip["reason"], 0) + 1
    return f"{summary(run, ctx.tmp)}; manifest written: rows_out {totals.get('rows_out')}, skipped {reasons}"


# --- configs -------------------------------------------------------------------------------------------

def run_config(ctx: Context, name: str, text: str, *extra, timeout: float = 45) -> str:
    config = ctx.file(name, f"workdir: {ctx.tmp / ('runs_' + name)}\n" + text)
    run = ctx.vitpose("run", "--config", config, "--stages", "shard", "--no-keep-serving", *TINY_SHARD, *extra,
                      timeout=timeout)
    done = (ctx.tmp / ("runs_" + name) / "shard" / "out" / "manifest.json").exists()
    return summary(run, ctx.tmp) + ("; the shard stage ran" if done else "")


@case("config.duplicate_key", "pipeline YAML with `shard:` twice (`vitpose run --config`)")
def _(ctx):
    return run_config(ctx, "dup.yaml", "shard:\n  rows_per_file: 4\nshard:\n  rows_per_file: 8\n")


@case("config.billion_laughs", "564-byte YAML of 9 levels x 9 nested aliases")
def _(ctx):
    bomb = "shard:\n  lol: &a [" + ",".join(['"lol"'] * 9) + "]\n" + "".join(
        f"  l{level}: &{chr(98 + level)} [" + ",".join([f"*{chr(97 + level)}"] * 9) + "]\n" for level in range(8))
    config = ctx.file("bomb.yaml", bomb)
    run = ctx.vitpose("run", "--config", config, "--stages", "shard", "--no-keep-serving", timeout=60)
    return summary(run, ctx.tmp)


@case("config.unknown_section", "pipeline YAML with a misspelt section `shrad:`")
def _(ctx):
    return run_config(ctx, "shrad.yaml", "shrad:\n  rows_per_file: 8\n")


@case("config.unknown_section_stage", "`vitpose shard --config` of a file whose section is misspelt `shrad:`")
def _(ctx):
    config = ctx.file("shrad_stage.yaml", "shrad:\n  rows_per_file: 8\n")
    return summary(ctx.vitpose("shard", "--config", config, timeout=45), ctx.tmp)


@case("config.section_typo", "`vitpose finetune --config local.yaml --section finetun`")
def _(ctx):
    run = ctx.vitpose("finetune", "--config", ctx.tree / "pipelines/configs/local.yaml", "--section", "finetun",
                      "--set", "data.shards=" + str(ctx.tmp / "no_shards"), timeout=45)
    return summary(run, ctx.tmp)


def run_stages(ctx: Context, selection: str) -> str:
    workdir = ctx.tmp / f"runs_stages_{abs(hash(selection))}"
    run = ctx.vitpose("run", "--stages", selection, "--no-keep-serving", "--set", f"workdir={workdir}", *TINY_SHARD,
                      timeout=45)
    ran = sorted(p.name for p in workdir.iterdir() if p.is_dir() and p.name != "logs") if workdir.exists() else []
    return summary(run, ctx.tmp) + (f"; stages started: {', '.join(ran)}" if ran else "")


@case("config.stages_comma", "`vitpose run --stages ,`")
def _(ctx):
    return run_stages(ctx, ",")


@case("config.stages_empty", "`vitpose run --stages ''`")
def _(ctx):
    return run_stages(ctx, "")


@case("config.stage_unknown", "`vitpose run --stages shard,fine`")
def _(ctx):
    return run_stages(ctx, "shard,fine")


@case("config.directory", "a directory given as `--config`")
def _(ctx):
    return summary(ctx.vitpose("shard", "--config", ctx.tmp), ctx.tmp)


@case("config.bad_set_yaml", "malformed `--set rows_per_file={a: [}`")
def _(ctx):
    return summary(ctx.vitpose("shard", "--set", "rows_per_file={a: [}"), ctx.tmp)


@case("config.non_utf8", "a Latin-1 config file")
def _(ctx):
    config = ctx.file("latin1.yaml", "shard:\n  out: caf\xe9\n".encode("latin-1"))
    return summary(ctx.vitpose("shard", "--config", config), ctx.tmp)


# --- evaluation ----------------------------------------------------------------------------------------

@case("eval.output_is_predictions", "`vitpose eval --output` = the predictions file")
def _(ctx):
    predictions = write_json(ctx, "out_pred/pred.json", example_predictions())
    before = predictions.read_bytes()
    run = ctx.vitpose("eval", "--annotations", COCO / "test_coco.json", "--predictions", predictions,
                      "--output", predictions)
    intact = predictions.read_bytes() == before
    return summary(run, ctx.tmp) + ("; predictions intact" if intact else "; PREDICTIONS OVERWRITTEN")


@case("eval.output_is_annotations", "`vitpose eval --output` = the annotations file")
def _(ctx):
    annotations = ctx.file("out_gt/gt.json", (COCO / "test_coco.json").read_bytes())
    run = ctx.vitpose("eval", "--annotations", annotations, "--predictions", COCO / "example_coco_preds.json",
                      "--output", annotations)
    intact = annotations.read_bytes() == (COCO / "test_coco.json").read_bytes()
    return summary(run, ctx.tmp) + ("; annotations intact" if intact else "; ANNOTATIONS OVERWRITTEN")


@case("eval.reference", "the sample predictions as shipped (the reference AP)")
def _(ctx):
    return eval_predictions(ctx, COCO / "example_coco_preds.json")


@case("eval.nan_keypoints", "every keypoint NaN (bare NaN tokens)")
def _(ctx):
    records = [{**r, "keypoints": [math.nan] * 51} for r in example_predictions()]
    return eval_predictions(ctx, write_json(ctx, "nan_kpt.json", records, allow_nan=True))


@case("eval.nan_keypoints_null", "every keypoint null (strict JSON)")
def _(ctx):
    records = [{**r, "keypoints": [None] * 51} for r in example_predictions()]
    return eval_predictions(ctx, write_json(ctx, "null_kpt.json", records))


@case("eval.nan_score", "one score NaN")
def _(ctx):
    records = example_predictions()
    records[3]["score"] = math.nan
    return eval_predictions(ctx, write_json(ctx, "nan_score.json", records, allow_nan=True))


@case("eval.inf_keypoint", "one keypoint +Infinity")
def _(ctx):
    records = example_predictions()
    records[3]["keypoints"][0] = math.inf
    return eval_predictions(ctx, write_json(ctx, "inf_kpt.json", records, allow_nan=True))


@case("eval.unknown_category", "predictions of image 785 with category_id 2 (the annotations have only 1)")
def _(ctx):
    records = [{**r, "category_id": 2} if r["image_id"] == 785 else r for r in example_predictions()]
    return eval_predictions(ctx, write_json(ctx, "cat2.json", records))


@case("eval.gt_image_missing", "ground truth whose image (785) is missing from `images` (its predictions removed)")
def _(ctx):
    data = json.loads((COCO / "test_coco.json").read_text())
    data["images"] = [i for i in data["images"] if i["id"] != 785]
    predictions = write_json(ctx, "pred_no785.json", [r for r in example_predictions() if r["image_id"] != 785])
    return eval_predictions(ctx, predictions, write_json(ctx, "gt_no785.json", data))


@case("eval.unknown_image", "a prediction for image 999 the annotations lack")
def _(ctx):
    records = example_predictions()
    records.append({**records[0], "image_id": 999})
    return eval_predictions(ctx, write_json(ctx, "img999.json", records))


@case("eval.record_not_object", "a prediction record `[1, 2, 3]`")
def _(ctx):
    return eval_predictions(ctx, write_json(ctx, "list_rec.json", [*example_predictions()[:2], [1, 2, 3]]))


@case("eval.string_keypoints", "a prediction whose keypoints are a string")
def _(ctx):
    records = example_predictions()
    records[3]["keypoints"] = "0 0 2"
    return eval_predictions(ctx, write_json(ctx, "str_kpt.json", records))


@case("eval.truncated_json", "a truncated predictions file")
def _(ctx):
    return eval_predictions(ctx, ctx.file("broken.json", '[{"image_id": 1,'))


@case("eval.non_utf8_annotations", "a Latin-1 annotations file")
def _(ctx):
    latin = ctx.file("latin1.json", '{"images": "caf\xe9"}'.encode("latin-1"))
    return eval_predictions(ctx, COCO / "example_coco_preds.json", latin)


# --- checkpoints and prediction ------------------------------------------------------------------------

IMAGE = COCO / "000000000785.jpg"  # 640 x 425


@case("predict.nan_weights", "`vitpose predict` with a NaN-weight checkpoint")
def _(ctx):
    out = ctx.tmp / "nan_predict"
    run = ctx.vitpose("predict", "--checkpoint", checkpoint(ctx, "nan_ckpt", nan=True), "--image", IMAGE,
                      "--output-dir", out)
    written = sorted(out.glob("*.json")) if out.exists() else []
    bare = [p.name for p in written if re.search(r"\bNaN\b|\bInfinity\b", p.read_text())]
    return summary(run, ctx.tmp) + (f"; wrote {', '.join(p.name for p in written)}" if written else "") + (
        "; bare NaN tokens in it" if bare else "")


@case("eval.nan_weights", "`vitpose eval --checkpoint` with a NaN-weight checkpoint, `--output`")
def _(ctx):
    output = ctx.tmp / "nan_eval" / "eval.json"
    run = ctx.vitpose("eval", "--checkpoint", checkpoint(ctx, "nan_ckpt", nan=True), "--annotations",
                      COCO / "test_coco.json", "--images", COCO, "--output", output)
    return " ".join(filter(None, [summary(run, ctx.tmp), ap_of(run)])) + (
        "; --output written" if output.exists() else "")


@case("predict.box_outside", "`vitpose predict --boxes 5000,5000,100,200` on a 640x425 image")
def _(ctx):
    out = ctx.tmp / "box_out"
    run = ctx.vitpose("predict", "--checkpoint", checkpoint(ctx, "tiny_ckpt"), "--image", IMAGE, "--boxes",
                      "5000,5000,100,200", "--output-dir", out)
    written = sorted(out.glob("*.json")) if out.exists() else []
    where = ""
    if written:
        def keypoints(value):  # the first "keypoints" list in the record, wherever it sits
            if isinstance(value, dict):
                if "keypoints" in value:
                    return value["keypoints"]
                value = list(value.values())
            for item in value if isinstance(value, list) else []:
                found = keypoints(item)
                if found is not None:
                    return found
            return None
        first = keypoints(json.loads(written[0].read_text())) or []
        flat = [v for point in first for v in (point if isinstance(point, list) else [point])]
        where = f"; wrote keypoints, the first at ({flat[0]:.0f}, {flat[1]:.0f}) (the image is 640x425)" if flat else ""
    return summary(run, ctx.tmp) + where


@case("predict.png_bomb", "`vitpose predict` on a 107 KB PNG claiming 30000x30000")
def _(ctx):
    bomb = png_bomb(ctx.tmp / "bomb" / "bomb.png")
    run = ctx.vitpose("predict", "--checkpoint", checkpoint(ctx, "tiny_ckpt"), "--image", bomb,
                      "--output-dir", ctx.tmp / "bomb_out", timeout=90)
    return summary(run, ctx.tmp)


@case("eval.png_bomb", "`vitpose eval --checkpoint --images` where one image is the PNG bomb")
def _(ctx):
    bomb_dir = ctx.tmp / "bomb_eval"
    png_bomb(bomb_dir / "bomb.png")
    gt = {"images": [{"id": 1, "file_name": "bomb.png", "width": 30000, "height": 30000}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 100, 200], "area": 20000,
                           "iscrowd": 0, "num_keypoints": 1, "keypoints": [50, 50, 2] + [0] * 48}],
          "categories": json.loads((COCO / "test_coco.json").read_text())["categories"]}
    run = ctx.vitpose("eval", "--checkpoint", checkpoint(ctx, "tiny_ckpt"), "--annotations",
                      write_json(ctx, "bomb_eval/gt.json", gt), "--images", bomb_dir, timeout=90)
    return summary(run, ctx.tmp)


@case("infer.png_bomb", "`vitpose infer` over a folder holding the PNG bomb and a real image")
def _(ctx):
    if not (ctx.tree / "pipelines" / "commands" / "infer.py").exists():
        return "n/a: no `vitpose infer` at this commit"
    folder = ctx.tmp / "bomb_infer"
    png_bomb(folder / "bomb.png")
    shutil.copy(IMAGE, folder / "real.jpg")
    out = ctx.tmp / "bomb_infer_out"
    run = ctx.vitpose("infer", "--checkpoint", checkpoint(ctx, "tiny_ckpt"), "--input", folder, "--out", out,
                      timeout=150)
    report = ""
    if (out / "infer.json").exists():
        info = json.loads((out / "infer.json").read_text())
        skipped = info.get("skipped") or info.get("unreadable") or {}
        report = f"; infer.json: {json.dumps(skipped)[:160]}"
    return summary(run, ctx.tmp) + report


@case("shard.png_bomb", "`vitpose shard` whose annotations name the PNG bomb")
def _(ctx):
    folder = ctx.tmp / "bomb_shard"
    png_bomb(folder / "bomb.png")
    data = json.loads((COCO / "test_coco.json").read_text())
    data["images"][0]["file_name"] = "bomb.png"
    data["images"][0]["width"] = data["images"][0]["height"] = 30000
    for name in ("000000040083.jpg", "000000196141.jpg", "000000197388.jpg"):
        shutil.copy(COCO / name, folder / name)
    annotations = write_json(ctx, "bomb_shard/gt.json", data)
    out = ctx.tmp / "bomb_shard_out"
    run = ctx.vitpose("shard", "--annotations", annotations, "--images", folder, "--dataset", "coco", "--split",
                      "val", "--out", out, timeout=150)
    return shard_outcome(ctx, run, out)


@case("export.out_is_checkpoint", "`vitpose export --format checkpoint --out` = the checkpoint itself")
def _(ctx):
    if not (ctx.tree / "pipelines" / "commands" / "export.py").exists():
        return "n/a: no `vitpose export` at this commit"
    target = ctx.tmp / "export_self"
    if not target.exists():
        shutil.copytree(checkpoint(ctx, "tiny_ckpt"), target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    run = ctx.vitpose("export", "--format", "checkpoint", "--checkpoint", target, "--out", target)
    after = {p.name: p.read_bytes() for p in target.iterdir()}
    return summary(run, ctx.tmp) + ("; checkpoint files unchanged" if after == before else
                                    "; CHECKPOINT FILES REWRITTEN IN PLACE")


@case("ckpt.truncated_safetensors", "`vitpose predict` with model.safetensors cut in half")
def _(ctx):
    broken = ctx.tmp / "truncated_ckpt"
    if not broken.exists():
        shutil.copytree(checkpoint(ctx, "tiny_ckpt"), broken)
        weights = broken / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return summary(ctx.vitpose("predict", "--checkpoint", broken, "--image", IMAGE, "--output-dir",
                               ctx.tmp / "trunc_out"), ctx.tmp)


@case("ckpt.empty_config", "`vitpose predict` with a checkpoint whose config.json is `{}`")
def _(ctx):
    broken = ctx.tmp / "empty_config_ckpt"
    if not broken.exists():
        shutil.copytree(checkpoint(ctx, "tiny_ckpt"), broken)
        (broken / "config.json").write_text("{}")
    return summary(ctx.vitpose("predict", "--checkpoint", broken, "--image", IMAGE, "--output-dir",
                               ctx.tmp / "empty_out"), ctx.tmp)


@case("predict.unknown_device", "`vitpose predict --device gpu0`")
def _(ctx):
    return summary(ctx.vitpose("predict", "--checkpoint", checkpoint(ctx, "tiny_ckpt"), "--image", IMAGE,
                               "--device", "gpu0", "--output-dir", ctx.tmp / "dev_out"), ctx.tmp)


@case("predict.unreachable_url", "`vitpose predict --url` of a closed port")
def _(ctx):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return summary(ctx.vitpose("predict", "--url", f"http://127.0.0.1:{port}", "--image", IMAGE, "--output-dir",
                               ctx.tmp / "url_out"), ctx.tmp)


# --- stage outputs, storage outages, signals -----------------------------------------------------------

@case("shard.out_dir_unrelated", "`vitpose shard --out DIR` where DIR holds README.md, notes/ and shards/notes.txt")
def _(ctx):
    out = ctx.tmp / "shard_owned"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "a.txt").write_text("mine")
    (out / "README.md").write_text("mine")
    (out / "shards").mkdir()
    (out / "shards" / "notes.txt").write_text("mine")
    run = ctx.vitpose("shard", "--annotations", COCO / "test_coco.json", "--images", COCO, "--dataset", "coco",
                      "--split", "val", "--out", out, timeout=150)
    kept = [name for name in ("README.md", "notes/a.txt", "shards/notes.txt") if (out / name).exists()]
    lost = [name for name in ("README.md", "notes/a.txt", "shards/notes.txt") if not (out / name).exists()]
    return summary(run, ctx.tmp) + f"; kept {kept or 'nothing'}" + (f"; DELETED {lost}" if lost else "")


@case("s3.shard_annotations_down", "`vitpose shard` with annotations and images on a stopped S3 endpoint")
def _(ctx):
    out = ctx.tmp / "s3_down_ann"
    run = ctx.vitpose("shard", "--annotations", "s3://hostile/raw/coco/test_coco.json", "--images",
                      "s3://hostile/raw/coco", "--dataset", "coco", "--split", "val", "--out", out,
                      env=s3_env(stopped_moto(ctx)), timeout=150)
    return shard_outcome(ctx, run, out)


@case("s3.shard_images_down", "`vitpose shard` with local annotations, images on a stopped S3 endpoint")
def _(ctx):
    out = ctx.tmp / "s3_down_img"
    run = ctx.vitpose("shard", "--annotations", COCO / "test_coco.json", "--images", "s3://hostile/raw/coco",
                      "--dataset", "coco", "--split", "val", "--out", out, env=s3_env(stopped_moto(ctx)), timeout=150)
    return shard_outcome(ctx, run, out)


@case("s3.bad_credentials", "`vitpose shard` with annotations on an S3 endpoint that refuses the keys")
def _(ctx):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        out = ctx.tmp / "s3_creds"
        run = ctx.vitpose("shard", "--annotations", "s3://b1/raw/test_coco.json", "--images", "s3://b1/raw",
                          "--dataset", "coco", "--split", "val", "--out", out,
                          env=s3_env(f"http://127.0.0.1:{port}"), timeout=150)
        return shard_outcome(ctx, run, out)
    finally:
        server.terminate()
        server.wait(timeout=30)


@case("mlflow.unreachable", "`vitpose run --stages shard` with `mlflow.tracking_uri` a closed port")
def _(ctx):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workdir = ctx.tmp / "runs_mlflow_down"
    run = ctx.vitpose("run", "--stages", "shard", "--no-keep-serving", "--set", f"workdir={workdir}",
                      "--set", f"mlflow.tracking_uri=http://127.0.0.1:{port}", *TINY_SHARD, timeout=300)
    return summary(run, ctx.tmp)


def interrupted_run(ctx: Context, stop_signal: int) -> str:
    workdir = ctx.tmp / f"runs_signal_{stop_signal}"
    run = ctx.vitpose("run", "--stages", "shard,pretrain", "--no-keep-serving", "--set", f"workdir={workdir}",
                      *TINY_SHARD, "--set", "pretrain.data.batch_size=8",
                      "--set", "pretrain.schedule.max_steps=500", timeout=240, stop_after=25,
                      stop_signal=stop_signal, ray_ready=True)
    left = f"{run['ray_left']} Ray processes left 20 s later" + (
        f" ({', '.join(run['ray_left_names'])})" if run["ray_left"] else "")
    return f"{summary(run, ctx.tmp)}; signal at {run['signalled_at']} s; {left}"


@case("run.sigterm", "SIGTERM to `vitpose run` 25 s after its Ray cluster is up")
def _(ctx):
    return interrupted_run(ctx, signal.SIGTERM)


@case("run.sigint", "SIGINT (Ctrl-C) to `vitpose run` 25 s after its Ray cluster is up")
def _(ctx):
    return interrupted_run(ctx, signal.SIGINT)


# --- the two commands ----------------------------------------------------------------------------------

def probe(args: argparse.Namespace) -> None:
    tree = Path(args.tree).resolve()
    only = set(args.only.split(",")) if args.only else None
    results = json.loads(Path(args.out).read_text())["cases"] if args.out and Path(args.out).exists() and only else {}
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="h18-") as tmp:
        ctx = Context(tree, Path(tmp))
        for case_id, what, fn in CASES:
            if only and case_id not in only:
                continue
            start = time.perf_counter()
            try:
                outcome = fn(ctx)
            except Exception as error:  # the probe itself failed: say so in the table
                outcome = f"probe failed: {type(error).__name__}: {error}"
            results[case_id] = {"what": what, "outcome": outcome, "stderr_tail": ctx.last_stderr}
            ctx.last_stderr = ""
            print(f"[{time.perf_counter() - start:5.1f} s] {case_id}: {outcome}", flush=True)
    record = {"label": args.label, "commit": commit, "cases": results}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))


def table(args: argparse.Namespace) -> None:
    runs = [json.loads(Path(p).read_text()) for p in args.runs]
    lines = ["| case | input | " + " | ".join(f"{r['label']} ({r['commit']})" for r in runs) + " |",
             "|---|---|" + "---|" * len(runs)]
    for case_id, what, _ in CASES:
        cells = [r["cases"].get(case_id, {}).get("outcome", "not probed").replace("\n", " ") for r in runs]
        lines.append(f"| `{case_id}` | {what} | " + " | ".join(cells) + " |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("probe")
    p.add_argument("--tree", default=str(REPO))
    p.add_argument("--label", default="after")
    p.add_argument("--out", default=None)
    p.add_argument("--only", default=None, help="comma-separated case ids (merged into an existing --out)")
    p.set_defaults(func=probe)
    t = commands.add_parser("table")
    t.add_argument("runs", nargs="+", help="probe JSON files, in column order")
    t.add_argument("--out", required=True)
    t.set_defaults(func=table)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
