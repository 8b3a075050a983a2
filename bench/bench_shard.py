"""Shard stage throughput and memory: Ray Data on 2 CPUs vs a single-process pycocotools + cv2 loop.

    python bench/bench_shard.py [--images 2000] [--large 20000] [--out bench/results/shard.json]

1. Generates `--images` synthetic COCO images (vitpose_core.synthetic) into a temp directory.
2. Baseline: one process, pycocotools to index the annotations, cv2 to read each image, the same
   `cut_person_crop` + JPEG encode as the shard stage, the same rows (`crop_table`, every column of
   the shard schema) written with pyarrow, 2048 rows per file. cv2 runs at its best setting for
   one process: both settings (its own thread pool, one thread) are timed at `--images` and the faster
   one is the baseline at every size. The loop does less per image than the stage (no header or
   truncation checks, no record validation, no manifest), so the ratio errs against Ray.
3. Ray: `run_shard` on `ray.init(num_cpus=2)` (after a small warm-up run that starts the workers).
4. Both again, side by side, on `--large` images: the same files linked under new names (every image
   is still read and decoded separately), which avoids spending minutes drawing them. When cv2's thread
   pool wins, the one-thread loop runs at `--large` too: Ray's tasks keep one core each busy, so the
   ratio to the one-thread loop says how well 2 CPUs are used, the ratio to the baseline what a user gains.

Each run is measured for wall time, CPU seconds (user + system, summed over the process and every
descendant: the whole local Ray cluster for Ray) and memory, sampled every second over the same
processes: private memory (RssAnon, summed) and shared memory (RssShmem, the largest single process,
which covers the object store it maps). CPU seconds do not depend on what else runs on the machine
as wall time does: Ray's CPU over the baseline's says how close 2 CPUs can get to 2x.

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
# Ray starts its workers at nice 15 and the baseline runs at nice 0: on a machine shared with other work that
# alone hands the baseline the CPU. Both arms at the same priority (the default only matters under contention).
os.environ.setdefault("RAY_worker_niceness", "0")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipelines.shard.crops import CropConfig, crop_table, cut_person_crop  # noqa: E402
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


def baseline(annotations: Path, folder: Path, out: Path, crop: CropConfig, cv2_threads: int | None = None,
             rows_per_file: int = 2048) -> dict:
    """The single-process loop: pycocotools index, cv2 decode, same crop + encode + rows, pyarrow write.

    `cv2_threads=None` leaves cv2's own thread pool on (what a plain script gets); 1 pins it to one core.
    """
    from pycocotools.coco import COCO

    saved_threads = cv2.getNumThreads()
    if cv2_threads is not None:
        cv2.setNumThreads(cv2_threads)
    out.mkdir(parents=True)
    with MemorySampler() as memory:
        coco = COCO(str(annotations))
        names = ("image", "keypoints", "crop_to_image", "num_keypoints", "bbox", "area", "image_id", "ann_id",
                 "dataset", "split", "source", "width", "height")
        columns: dict[str, list] = {name: [] for name in names}
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
                values = (encoded.tobytes(), moved, cv2.invertAffineTransform(image_to_crop), ann["num_keypoints"],
                          ann["bbox"], ann["area"], image_id, ann["id"], "coco", "train", info["file_name"],
                          info["width"], info["height"])
                for name, value in zip(names, values, strict=True):
                    columns[name].append(value)
                crops += 1
                if len(columns["image"]) == rows_per_file:
                    pq.write_table(crop_table(columns, crop), out / f"part-{part:05d}.parquet")
                    columns, part = {name: [] for name in names}, part + 1
        if columns["image"]:
            pq.write_table(crop_table(columns, crop), out / f"part-{part:05d}.parquet")
    cv2.setNumThreads(saved_threads)
    return {"cv2_threads": cv2_threads or saved_threads, "crops": crops, **memory.figures(crops)}


class MemorySampler:
    """Wall time, CPU seconds, peak private (RssAnon, summed) and shared (RssShmem, max) memory of this process tree.

    Sampling costs the measured process CPU, more so when the machine runs many processes: memory is read
    every second, the process tree (a walk over all of /proc) found again every 5 s; the same for both arms.
    """

    def __init__(self, interval: float = 1.0) -> None:
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
        tree, frontier = [os.getpid()], {os.getpid()}
        while frontier:
            frontier = {pid for pid, ppid in parents.items() if ppid in frontier}
            tree += frontier
        return tree

    def _sample(self) -> None:
        private, shared = 0, 0
        self._samples = getattr(self, "_samples", -1) + 1
        if self._samples % 5 == 0:
            self._pids = self._tree()
        for pid in self._pids:
            try:
                with open(f"/proc/{pid}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
            except OSError:
                continue
            private += int(fields.get("RssAnon", "0 kB").split()[0]) * 1024
            shared = max(shared, int(fields.get("RssShmem", "0 kB").split()[0]) * 1024)
        self.peak_private, self.peak_shared = max(self.peak_private, private), max(self.peak_shared, shared)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    @classmethod
    def _cpu_seconds(cls) -> dict[int, float]:
        """pid -> user + system CPU seconds (its own and its waited-for children's) over the tree."""
        seconds = {}
        for pid in cls._tree():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            seconds[pid] = sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
        return seconds

    def __enter__(self) -> MemorySampler:
        self._cpu_start = self._cpu_seconds()
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start
        self._stop.set()
        self._thread.join()
        self._sample()
        end = self._cpu_seconds()
        self.cpu_seconds = sum(s - self._cpu_start.get(pid, 0.0) for pid, s in end.items())

    def figures(self, crops: int) -> dict:
        return {"seconds": round(self.seconds, 2), "crops_per_s": round(crops / self.seconds, 1),
                "cpu_seconds": round(self.cpu_seconds, 2), "peak_private_mib": round(self.peak_private / 2**20),
                "peak_shared_mib": round(self.peak_shared / 2**20), "load_avg_1min_after": round(os.getloadavg()[0], 1)}


def ray_run(annotations: Path, folder: Path, out: Path, crop: CropConfig, images: int, **shard: int) -> dict:
    from pipelines.shard.config import ShardConfig
    from pipelines.shard.run import run_shard

    config = ShardConfig.model_validate({
        "sources": [{"annotations": str(annotations), "images": str(folder), "dataset": "coco", "split": "train"}],
        "out": str(out), "crop": crop.model_dump(), **shard})
    with MemorySampler() as memory:
        manifest = run_shard(config, force=True)
    crops = manifest["totals"]["rows_out"]
    return {"images": images, "crops": crops, "skipped": manifest["totals"]["skipped"],
            "files": len(manifest["files"]), **memory.figures(crops)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--large", type=int, default=20000, help="images for the second comparison (0: skip)")
    parser.add_argument("--images-per-task", type=int, default=None, help="ShardConfig.images_per_task (default: its default)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "shard.json")
    args = parser.parse_args()
    import ray

    from pipelines.shard.config import ShardConfig

    crop = CropConfig()
    shard = {"images_per_task": args.images_per_task} if args.images_per_task else {}
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "ray": ray.__version__, "opencv": cv2.__version__,
                                 "ray_worker_niceness": int(os.environ["RAY_worker_niceness"]), "baseline_niceness": os.nice(0),
                                 "load_avg_at_start": round(os.getloadavg()[0], 1)},
                     "crop": crop.model_dump(), "images": args.images, "large": args.large,
                     "images_per_task": shard.get("images_per_task", ShardConfig.model_fields["images_per_task"].default),
                     "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench_shard_") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        annotations, folder, document = make_dataset(root, args.images)
        results["generate_seconds"] = round(time.perf_counter() - start, 1)
        print(f"generated {args.images} images in {results['generate_seconds']} s", flush=True)
        warm, _, _ = make_dataset(root / "warm", 20, seed=1)  # before ray.init: no fork of a Ray driver
        sizes = [(args.images, annotations, folder)]
        if args.large:
            big, big_folder = replicate(document, folder, root, max(1, args.large // args.images))
            sizes.append((args.large, big, big_folder))

        def record(run: str, images: int, figures: dict) -> None:
            results["runs"].append({"run": run, "images": images, **figures})
            print(run, images, figures, flush=True)

        # cv2's best setting for one process, chosen at the small size
        threads_on = baseline(annotations, folder, root / "base_threads", crop)
        record("single process, cv2 threads on", args.images, threads_on)
        one_thread = baseline(annotations, folder, root / "base_1", crop, cv2_threads=1)
        record("single process, cv2 on 1 thread", args.images, one_thread)
        best = None if threads_on["seconds"] < one_thread["seconds"] else 1
        results["baseline_cv2_threads"] = best or "cv2 default"
        baseline_of = {args.images: threads_on if best is None else one_thread}  # images -> the baseline run

        one_thread_of = {args.images: one_thread}
        for images, ann, images_dir in sizes[1:]:  # the small size's baselines ran above
            baseline_of[images] = baseline(ann, images_dir, root / f"base_{images}", crop, cv2_threads=best)
            record("single process (baseline)", images, baseline_of[images])
            if best is None:  # the one-thread loop too: the loop that keeps one core busy, as Ray's tasks do
                one_thread_of[images] = baseline(ann, images_dir, root / f"base_1_{images}", crop, cv2_threads=1)
                record("single process, cv2 on 1 thread", images, one_thread_of[images])
            else:
                one_thread_of[images] = baseline_of[images]

        # Ray last: an idle local cluster would count in the baseline's process tree and take CPU from it
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
        # starts both Ray workers: 4 tasks of 5 images, two at a time
        ray_run(warm, root / "warm" / "images", root / "warm_out", crop, 20, images_per_task=5)
        for images, ann, images_dir in sizes:
            record("Ray Data, 2 CPUs", images, ray_run(ann, images_dir, root / f"ray_{images}", crop, images, **shard))
        results["machine"]["load_avg_at_end"] = round(os.getloadavg()[0], 1)
        ray.shutdown()
    results["speedup"] = {str(r["images"]): {"wall": round(r["crops_per_s"] / baseline_of[r["images"]]["crops_per_s"], 2),
                                             "cpu_seconds_ratio": round(r["cpu_seconds"] / baseline_of[r["images"]]["cpu_seconds"], 2),
                                             "wall_over_one_thread": round(r["crops_per_s"] / one_thread_of[r["images"]]["crops_per_s"], 2)}
                          for r in results["runs"] if r["run"].startswith("Ray")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    args.out.with_suffix(".md").write_text(to_markdown(results))
    print(args.out.with_suffix(".md").read_text())


def to_markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# Shard stage benchmark (bench/bench_shard.py)", "",
        f"Synthetic COCO images {SyntheticConfig().width}x{SyntheticConfig().height}, crops "
        f"{r['crop']['width']}x{r['crop']['height']} JPEG q{r['crop']['jpeg_quality']}; {m['cpus']} CPUs, Ray {m['ray']}, "
        f"OpenCV {m['opencv']}; Ray Data {r['images_per_task']} images per task; baseline cv2 threads: "
        f"{r['baseline_cv2_threads']}; nice: Ray workers {m['ray_worker_niceness']}, baseline {m['baseline_niceness']}. Load average {m['load_avg_at_start']} at start, {m['load_avg_at_end']} at end.", "",
        "| run | images | crops | seconds | crops/s | CPU seconds | peak private MiB | peak shared MiB | load after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in r["runs"]:
        lines.append(f"| {run['run']} | {run['images']} | {run['crops']} | {run['seconds']} | {run['crops_per_s']} | "
                     f"{run['cpu_seconds']} | {run['peak_private_mib']} | {run['peak_shared_mib']} | "
                     f"{run['load_avg_1min_after']} |")
    lines += ["", "Ray Data over the single-process loop (crops/s), and Ray's CPU seconds over the loop's: "
              + "; ".join(f"{n} images: {v['wall']}x, CPU {v['cpu_seconds_ratio']}x" for n, v in r["speedup"].items())
              + ". Over the loop with cv2 on one thread: "
              + "; ".join(f"{n} images: {v['wall_over_one_thread']}x" for n, v in r["speedup"].items() if "wall_over_one_thread" in v)
              + ".", "",
              "Ray timings are `run_shard` end to end: parsing and validating the annotations, planning, the tasks, "
              "the manifest; both workers were started by a 20-image warm-up run. CPU seconds and memory cover the "
              "driver and every Ray process (raylet, GCS, workers, Ray's own actors), or the one baseline process.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
