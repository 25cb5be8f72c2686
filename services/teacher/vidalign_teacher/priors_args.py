"""Command-line arguments of `vidalign priors extract|show`, kept free of heavy imports
so that building the `vidalign` parser stays fast."""

from __future__ import annotations

import argparse


def add_extract_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset dir or meta file (MotionBench layout)")
    parser.add_argument("--out", required=True, help="store URI of the priors set (dir or s3://...)")
    parser.add_argument("--bench", default="motionbench", help="benchmark loader (default motionbench)")
    parser.add_argument("--video-dir", help="where the videos are (default: beside the annotations)")
    parser.add_argument("--model", default="tiny-cogvideox", help="CogVideoX model (registry name or dir)")
    parser.add_argument("--teacher", default="", help="host:port of a CogVideoX teacher; default in-process")
    parser.add_argument("--device", help="in-process device (default: cuda if available)")
    parser.add_argument("--shard-size", type=int, default=64, help="clips per committed shard")
    parser.add_argument("--frames", type=int, default=0, help="frames per clip (default: the model's)")
    parser.add_argument("--height", type=int, default=0, help="resize height (default: the model's)")
    parser.add_argument("--width", type=int, default=0, help="resize width (default: the model's)")
    parser.add_argument("--steps", type=int, default=5, help="DDIM inversion/denoising steps")
    parser.add_argument("--guidance", type=float, default=6.0)
    parser.add_argument("--head-ratio", type=float, default=0.5)
    parser.add_argument("--token-ratio", type=float, default=0.5)
    parser.add_argument("--chunk-size", type=int, default=256, help="attention capture chunk (memory)")
    parser.add_argument("--no-memory", action="store_true", help="denoise without cross-stream memory")
    parser.add_argument("--skip-missing", action="store_true", help="skip clips whose video is missing")


def add_show_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--priors", required=True, help="priors set URI, or one .safetensors file")
    parser.add_argument("--clip", action="append", default=[], help="clip id (repeatable; default: the first)")
    parser.add_argument("--out", required=True, help="directory for the PNGs")
    parser.add_argument("--max-tokens", type=int, default=0, help="render at most N tokens (0: all)")
    parser.add_argument("--video-dir", help="look for the videos here instead of the recorded paths")
