"""`vitpose synth`: a synthetic COCO-format person-keypoints dataset (images + annotation JSON).

    vitpose synth --out DIR_OR_URI --num-images 2000 [--seed 0] [--width 320 --height 240] [--split train]

Writes OUT/images/<id>.jpg and OUT/annotations/person_keypoints_<split>.json. Deterministic in
(seed, image index): the same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("synth", help="procedurally drawn people with COCO keypoints",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory or s3:// prefix")
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--max-people", type=int, default=4)
    parser.add_argument("--split", choices=["train", "val"], default="train")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines import storage
    from pipelines.shard.run import write_synthetic_dataset
    from vitpose_core.synthetic import SyntheticConfig

    config = SyntheticConfig(num_images=args.num_images, seed=args.seed, width=args.width, height=args.height,
                             max_people=args.max_people)
    out = storage.normalize(args.out)
    print(write_synthetic_dataset(out, config, args.split))
    return 0
