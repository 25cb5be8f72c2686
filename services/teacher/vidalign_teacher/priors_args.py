"""Command-line arguments of `vidalign priors extract|show`, kept free of heavy imports
so that building the `vidalign` parser stays fast."""

from __future__ import annotations

import argparse

from vidalign.config import HelpFormatter, add_option
from vidalign.papers import (
    ME_DDIM_STEPS,
    ME_GUIDANCE,
    ME_HEAD_RATIO,
    ME_TOKEN_RATIO,
)
from vidalign.teacher.credential_args import add_client_credential_arguments


def add_extract_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = HelpFormatter
    parser.add_argument("--data", required=True,
                        help="dataset dir or meta file (MotionBench layout), or with --bench "
                             "records|shards|motionvid: a `data prepare` subset, a `data shard` "
                             "set or a MotionVid-QA file (path or store URI)")
    parser.add_argument("--out", required=True, metavar="URI",
                        help="store URI of the priors set (dir or s3://...)")
    parser.add_argument("--bench", default="motionbench",
                        help="benchmark loader, or records, shards, motionvid (one unit per clip)")
    parser.add_argument("--video-dir", help="where the videos are (default: beside the annotations)")
    add_option(parser, "--teacher-model", old=("--model",), metavar="NAME", default="tiny-cogvideox",
               help="CogVideoX model (registry name or dir): run here, or the one the --teacher "
                    "service must host")
    parser.add_argument("--teacher", default="", metavar="ADDRESS",
                        help="host:port of a CogVideoX teacher service "
                             "(default: none: the model runs in this process)")
    add_client_credential_arguments(parser)
    parser.add_argument("--device", help="in-process device (default: cuda if available)")
    parser.add_argument("--shard-size", type=int, default=64, help="clips per committed shard")
    parser.add_argument("--frames", type=int, default=0, help="frames per clip; 0: the model's")
    parser.add_argument("--height", type=int, default=0, help="resize height; 0: the model's")
    parser.add_argument("--width", type=int, default=0, help="resize width; 0: the model's")
    parser.add_argument("--steps", type=int, default=ME_DDIM_STEPS,
                        help="DDIM inversion steps, and as many denoising steps after them")
    parser.add_argument("--guidance", type=float, default=ME_GUIDANCE,
                        help="classifier-free guidance scale of the denoising pass")
    parser.add_argument("--head-ratio", type=float, default=ME_HEAD_RATIO,
                        help="share of attention heads MHS keeps")
    parser.add_argument("--token-ratio", type=float, default=ME_TOKEN_RATIO,
                        help="share of text tokens MTTI keeps")
    parser.add_argument("--chunk-size", type=int, default=0,
                        help="query rows per attention-capture chunk (memory); 0: auto, from the "
                             "token count and device (default)")
    parser.add_argument("--no-memory", action="store_true",
                        help="denoise without cross-stream memory")
    parser.add_argument("--skip-missing", action="store_true",
                        help="skip clips whose video is missing instead of failing")
    parser.add_argument("--max-skip-fraction", type=float, default=0.01,
                        help="stop when more than this fraction of the clips read were unreadable "
                             "(each listed in OUT/skipped.jsonl)")
    parser.add_argument("--rank", type=int, default=0,
                        help="this process's share of the shards: every WORLD_SIZE-th from RANK")
    parser.add_argument("--world-size", type=int, default=1,
                        help="processes splitting the shards; the last to finish commits the index")


def add_show_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = HelpFormatter
    parser.add_argument("--priors", required=True, metavar="URI",
                        help="priors set URI, or one .safetensors file")
    parser.add_argument("--clip", action="append", default=[],
                        help="clip id, repeatable (default: the first clip)")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory for the PNGs")
    parser.add_argument("--max-tokens", type=int, default=0, help="render at most N tokens; 0: all")
    parser.add_argument("--video-dir",
                        help="look for the videos here (default: the paths the priors recorded)")
