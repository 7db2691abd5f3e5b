"""Edit an image with FLUX Kontext: an instruction, the image, and up to three references.

    export BFL_API_KEY=...                  # from https://dashboard.bfl.ai
    python examples/kontext_edit.py photo.jpg "make it a snowy night" -o out/
    python examples/kontext_edit.py room.png "put this lamp on the desk" --reference lamp.png

The images are sent as `input_image`, `input_image_2`... (read from disk and base64-encoded
by the client; an http(s) URL is sent as is). Add --fake to run against the fake API bundled
with bfl_async: no key, no cost.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bfl_async import AsyncBFL, BFLError, GeneratedImage, MissingAPIKeyError
from bfl_async.testing import fake_client

MODELS = ("flux-kontext-pro", "flux-kontext-max")
MAX_IMAGES = 4  # input_image .. input_image_4


async def edit(
    client: AsyncBFL,
    image: str | Path,
    instruction: str,
    references: Sequence[str | Path] = (),
    *,
    model: str = "flux-kontext-pro",
    aspect_ratio: str | None = None,
    output_dir: str | Path = "out",
) -> GeneratedImage:
    """Apply `instruction` to `image`, with `references` as further input images."""
    inputs: dict[str, Any] = {"input_image": _source(image)}
    for number, reference in enumerate(references, start=2):
        inputs[f"input_image_{number}"] = _source(reference)
    if aspect_ratio is not None:
        inputs["aspect_ratio"] = aspect_ratio
    return await client.generate(model, prompt=instruction, output_dir=output_dir, **inputs)


def _source(image: str | Path) -> str | Path:
    """A URL stays a URL (BFL fetches it); anything else is a file to read."""
    text = str(image)
    return text if text.startswith(("http://", "https://")) else Path(image)


async def main(args: argparse.Namespace) -> int:
    if 1 + len(args.reference) > MAX_IMAGES:
        print(f"error: at most {MAX_IMAGES - 1} reference images", file=sys.stderr)
        return 2
    try:
        async with fake_client() if args.fake else AsyncBFL() as client:
            try:
                image = await edit(
                    client,
                    args.image,
                    args.instruction,
                    args.reference,
                    model=args.model,
                    aspect_ratio=args.aspect_ratio,
                    output_dir=args.output_dir,
                )
            except BFLError as exc:  # ParameterError for an unreadable image, moderation...
                print(f"error: {exc}", file=sys.stderr)
                return 1
    except MissingAPIKeyError as exc:
        print(f"error: {exc}\n(or add --fake to try it without a key)", file=sys.stderr)
        return 2
    print(f"saved {image.path}")
    print(f"task {image.task_id} on {image.model}, {1 + len(args.reference)} input image(s)")
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Edit an image with FLUX Kontext.")
    parser.add_argument("image", help="the image to edit: a file or an http(s) URL")
    parser.add_argument("instruction", help='what to change, e.g. "make it night"')
    parser.add_argument(
        "--reference", action="append", default=[], help="a further input image (up to 3)"
    )
    parser.add_argument("--model", choices=MODELS, default="flux-kontext-pro")
    parser.add_argument("--aspect-ratio", help='e.g. "16:9" (default: the input\'s)')
    parser.add_argument("-o", "--output-dir", default="out")
    parser.add_argument("--fake", action="store_true", help="use the bundled fake API")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
