"""Shard stage throughput and memory: Ray Data on 2 CPUs vs a single-process pycocotools + cv2 loop.

    python bench/bench_shard.py [--images 2000] [--large 20000] [--out bench/results/shard.json]

1. Generates `--images` synthetic COCO images (vitpose_core.synthetic) into a temp directory.
2. Baseline: one process, pycocotools to index the annotations, cv2 to read each image, the same
   `cut_person_crop` + JPEG encode as the shard stage, pyarrow to write Parquet.
3. Ray: `run_shard` on `ray.init(num_cpus=2)` (after a small warm-up run that starts the workers).
4. Memory: the same Ray run on `--large` images. Those are the same files linked under new names
   (every image is still read and decoded separately), which avoids spending minutes drawing them.
   Memory is sampled every 0.2 s over the driver and all its descendant processes (the whole local
   Ray cluster): private memory (RssAnon, summed) and shared memory (RssShmem, the largest
   single process, which covers the object store it maps).

Writes JSON and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from multiprocessing import Pool
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipelines.shard.crops import CropConfig, cut_person_crop  # noqa: E402
from vitpose_core.synthetic import SyntheticConfig, coco_document, iter_dataset  # noqa: E402


def _write_slice(args: tuple[SyntheticConfig, int, int, str]) -> tuple[list, list]:
    config, start, stop, folder = args
    images, annotations = [], []
    for entry, jpeg, anns in iter_dataset(config, start, stop):
        Path(folder, entry["file_name"]).write_bytes(jpeg)
        images.append(entry)
        annotations.extend(anns)
    return images, annotations


def make_dataset(root: Path, num_images: int, seed: int = 0) -> tuple[Path, Path, dict]:
    config = SyntheticConfig(num_images=num_images, seed=seed)
    folder = root / "images"
    folder.mkdir(parents=True)
    chunks = [(config, s, min(s + 100, num_images), str(folder)) for s in range(0, num_images, 100)]
    with Pool(2) as pool:
        parts = pool.map(_write_slice, chunks)
    document = coco_document([i for p in parts for i in p[0]], [a for p in parts for a in p[1]], config)
    annotations = root / "person_keypoints_train.json"
    annotations.write_text(json.dumps(document))
    return annotations, folder, document


def replicate(document: dict, folder: Path, root: Path, copies: int) -> tuple[Path, Path]:
    """`copies` x the dataset under new image ids and names, as symlinks to the same files."""
    big = root / "images_big"
    big.mkdir()
    images, annotations = [], []
    for c in range(copies):
        for entry in document["images"]:
            new_id = c * 10_000_000 + entry["id"]
            name = f"{c:03d}_{entry['file_name']}"
            (big / name).symlink_to(folder / entry["file_name"])
            images.append({**entry, "id": new_id, "file_name": name})
        annotations += [{**a, "id": c * 10_000_000_00 + a["id"], "image_id": c * 10_000_000 + a["image_id"]}
                        for a in document["annotations"]]
    path = root / "person_keypoints_big.json"
    path.write_text(json.dumps({**document, "images": images, "annotations": annotations}))
    return path, big


def baseline(annotations: Path, folder: Path, out: Path, crop: CropConfig, cv2_threads: int | None = None) -> dict:
    """The single-process loop: pycocotools index, cv2 decode, same crop + encode, pyarrow write.

    `cv2_threads=None` leaves cv2's own thread pool on (what a plain script gets); 1 pins it to one core.
    """
    from pycocotools.coco import COCO

    saved_threads = cv2.getNumThreads()
    if cv2_threads is not None:
        cv2.setNumThreads(cv2_threads)
    start = time.perf_counter()
    coco = COCO(str(annotations))
    out.mkdir(parents=True)
    rows: dict[str, list] = {"image": [], "keypoints": [], "crop_to_image": [], "ann_id": []}
    crops, part = 0, 0
    for image_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(image_id)[0]
        image = cv2.imread(str(folder / info["file_name"]), cv2.IMREAD_COLOR)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False)):
            if ann["num_keypoints"] == 0 or ann["bbox"][2] <= 0 or ann["bbox"][3] <= 0:
                continue
            keypoints = np.asarray(ann["keypoints"], np.float64).reshape(-1, 3)
            pixels, image_to_crop, moved = cut_person_crop(image, ann["bbox"], keypoints, crop)
            ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, crop.jpeg_quality])
            rows["image"].append(encoded.tobytes())
            rows["keypoints"].append(moved.astype(np.float32).reshape(-1).tolist())
            rows["crop_to_image"].append(cv2.invertAffineTransform(image_to_crop).reshape(-1).tolist())
            rows["ann_id"].append(ann["id"])
            crops += 1
            if len(rows["image"]) == 2048:
                pq.write_table(pa.table(rows), out / f"part-{part:05d}.parquet")
                rows, part = {k: [] for k in rows}, part + 1
    if rows["image"]:
        pq.write_table(pa.table(rows), out / f"part-{part:05d}.parquet")
    seconds = time.perf_counter() - start
    cv2.setNumThreads(saved_threads)
    return {"crops": crops, "seconds": round(seconds, 2), "crops_per_s": round(crops / seconds, 1)}


class MemorySampler:
    """Peak private (RssAnon, summed) and shared (RssShmem, max) memory of this process tree."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak_private, self.peak_shared = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _tree() -> list[int]:
        parents: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
        tree, frontier = [os.getpid()], [os.getpid()]
        while frontier:
            frontier = [pid for pid, ppid in parents.items() if ppid in set(frontier)]
            tree += frontier
        return tree

    def _sample(self) -> None:
        private, shared = 0, 0
        for pid in self._tree():
            try:
                with open(f"/proc/{pid}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
            except OSError:
                continue
            private += int(fields.get("RssAnon", "0 kB").split()[0]) * 1024
            shared = max(shared, int(fields.get("RssShmem", "0 kB").split()[0]) * 1024)
        self.peak_private, self.peak_shared = max(self.peak_private, private), max(self.peak_shared, shared)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def ray_run(annotations: Path, folder: Path, out: Path, crop: CropConfig, images: int,
            images_per_task: int = 16) -> dict:
    from pipelines.shard.config import ShardConfig
    from pipelines.shard.run import run_shard

    config = ShardConfig.model_validate({
        "sources": [{"annotations": str(annotations), "images": str(folder), "dataset": "coco", "split": "train"}],
        "out": str(out), "crop": crop.model_dump(), "images_per_task": images_per_task})
    with MemorySampler() as memory:
        start = time.perf_counter()
        manifest = run_shard(config, force=True)
        seconds = time.perf_counter() - start
    crops = manifest["totals"]["rows_out"]
    return {"images": images, "crops": crops, "skipped": manifest["totals"]["skipped"], "seconds": round(seconds, 2),
            "crops_per_s": round(crops / seconds, 1), "peak_private_mib": round(memory.peak_private / 2**20),
            "peak_shared_mib": round(memory.peak_shared / 2**20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--large", type=int, default=20000, help="images for the second memory point (0: skip)")
    parser.add_argument("--images-per-task", type=int, default=16, help="ShardConfig.images_per_task")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "shard.json")
    args = parser.parse_args()
    import ray

    crop = CropConfig()
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "ray": ray.__version__, "load_avg_at_start": os.getloadavg()[0]},
                     "crop": crop.model_dump(), "images": args.images,
                     "images_per_task": args.images_per_task}
    with tempfile.TemporaryDirectory(prefix="bench_shard_") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        annotations, folder, document = make_dataset(root, args.images)
        results["generate_seconds"] = round(time.perf_counter() - start, 1)
        print(f"generated {args.images} images in {results['generate_seconds']} s", flush=True)
        warm, _, _ = make_dataset(root / "warm", 20, seed=1)  # before ray.init: no fork of a Ray driver
        results["baseline_single_process"] = baseline(annotations, folder, root / "baseline", crop)
        print("baseline", results["baseline_single_process"], flush=True)
        results["baseline_single_thread"] = baseline(annotations, folder, root / "baseline1", crop, cv2_threads=1)
        print("baseline, cv2 on one thread", results["baseline_single_thread"], flush=True)

        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
        ray_run(warm, root / "warm" / "images", root / "warm_out", crop, 20)  # starts the Ray workers
        results["ray_data_2cpu"] = ray_run(annotations, folder, root / "ray_out", crop, args.images, args.images_per_task)
        print("ray", results["ray_data_2cpu"], flush=True)
        if args.large:
            big, big_folder = replicate(document, folder, root, max(1, args.large // args.images))
            results["ray_data_2cpu_large"] = ray_run(big, big_folder, root / "ray_big", crop, args.large, args.images_per_task)
            print("ray large", results["ray_data_2cpu_large"], flush=True)
        results["machine"]["load_avg_at_end"] = os.getloadavg()[0]
        ray.shutdown()
    results["speedup"] = round(results["ray_data_2cpu"]["crops_per_s"] / results["baseline_single_process"]["crops_per_s"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    args.out.with_suffix(".md").write_text(to_markdown(results))
    print(args.out.with_suffix(".md").read_text())


def to_markdown(r: dict) -> str:
    b, s = r["baseline_single_process"], r["ray_data_2cpu"]
    lines = [
        "# Shard stage benchmark (bench/bench_shard.py)", "",
        f"Synthetic COCO images {SyntheticConfig().width}x{SyntheticConfig().height}, crops "
        f"{r['crop']['width']}x{r['crop']['height']} JPEG q{r['crop']['jpeg_quality']}; "
        f"{r['machine']['cpus']} CPUs, Ray {r['machine']['ray']}; load average "
        f"{r['machine']['load_avg_at_start']:.1f} at start, {r['machine']['load_avg_at_end']:.1f} at end "
        "(other jobs shared the machine).", "",
        "| run | images | crops | seconds | crops/s | peak private MiB | peak shared MiB |",
        "|---|---|---|---|---|---|---|",
        f"| single process (pycocotools + cv2, cv2 threads on) | {r['images']} | {b['crops']} | {b['seconds']} | {b['crops_per_s']} | - | - |",
        f"| Ray Data, 2 CPUs, {r.get('images_per_task', 16)} images/task | {s['images']} | {s['crops']} | {s['seconds']} | {s['crops_per_s']} | "
        f"{s['peak_private_mib']} | {s['peak_shared_mib']} |",
    ]
    if "baseline_single_thread" in r:
        t = r["baseline_single_thread"]
        lines.insert(-1, f"| single process, cv2 on 1 thread | {r['images']} | {t['crops']} | {t['seconds']} | "
                         f"{t['crops_per_s']} | - | - |")
    if "ray_data_2cpu_large" in r:
        g = r["ray_data_2cpu_large"]
        lines.append(f"| Ray Data, 2 CPUs | {g['images']} | {g['crops']} | {g['seconds']} | {g['crops_per_s']} | "
                     f"{g['peak_private_mib']} | {g['peak_shared_mib']} |")
    lines += ["", f"Speed-up of Ray Data over the single-process loop: {r['speedup']}x. Ray timings include "
              "planning, task scheduling and reading back the written files for the manifest; the workers "
              "were started by a 20-image warm-up run. Peak memory covers the driver and every Ray process.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
