"""Generate one image with FLUX and save it.

    export BFL_API_KEY=...                  # from https://dashboard.bfl.ai
    python examples/single_image.py "a red fox in fresh snow" -o out/
    python examples/single_image.py "a red fox" --model flux-kontext-pro -o out/

Add --fake to run against the fake API bundled with bfl_async: no key, no cost.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from bfl_async import AsyncBFL, BFLError, MissingAPIKeyError
from bfl_async.testing import fake_client


async def main(args: argparse.Namespace) -> int:
    try:
        async with fake_client() if args.fake else AsyncBFL() as client:
            try:
                image = await client.generate(
                    args.model,
                    prompt=args.prompt,
                    width=args.width,
                    height=args.height,
                    output_dir=args.output_dir,
                )
            except BFLError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
    except MissingAPIKeyError as exc:
        print(f"error: {exc}\n(or add --fake to try it without a key)", file=sys.stderr)
        return 2
    print(f"saved {image.path}")
    cost = "not reported (FLUX.1)" if image.cost is None else f"{image.cost} credits"
    print(f"task {image.task_id}, seed {image.seed}, cost {cost}")
    print(f"took {image.timings.total:.1f} s (generation {image.timings.generation:.1f} s)")
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Generate one image with FLUX.")
    parser.add_argument("prompt")
    parser.add_argument("-o", "--output-dir", default="out")
    parser.add_argument("--model", default="flux-2-pro")
    # Not sent unless given: the model's default size, and models sized by aspect ratio
    # (flux-kontext-pro, flux-pro-1.1-ultra) take no width or height.
    parser.add_argument("--width", type=int, help="default: the model's")
    parser.add_argument("--height", type=int, help="default: the model's")
    parser.add_argument("--fake", action="store_true", help="use the bundled fake API")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
