"""The same client under trio: a few images generated concurrently in a nursery.

    pip install trio
    export BFL_API_KEY=...                  # from https://dashboard.bfl.ai
    python examples/trio_example.py "a red fox" "a lighthouse" "a teapot" -o out/

bfl_async is built on anyio, so nothing changes but the event loop. Add --fake to run
against the fake API bundled with bfl_async: no key, no cost.
"""

from __future__ import annotations

import argparse
import sys

import trio

from bfl_async import AsyncBFL, BFLError, GeneratedImage, MissingAPIKeyError
from bfl_async.testing import fake_client


async def main(args: argparse.Namespace) -> int:
    results: dict[str, GeneratedImage | BFLError] = {}

    async def one(client: AsyncBFL, prompt: str) -> None:
        try:
            results[prompt] = await client.generate(
                args.model, prompt=prompt, output_dir=args.output_dir
            )
        except BFLError as exc:  # this image failed; the others go on
            results[prompt] = exc

    try:
        async with (
            fake_client() if args.fake else AsyncBFL() as client,
            trio.open_nursery() as nursery,
        ):
            for prompt in args.prompts:
                nursery.start_soon(one, client, prompt)
    except MissingAPIKeyError as exc:
        print(f"error: {exc}\n(or add --fake to try it without a key)", file=sys.stderr)
        return 2
    for prompt in args.prompts:
        result = results[prompt]
        if isinstance(result, GeneratedImage):
            print(f"{result.path}  {prompt}")
        else:
            print(f"FAILED ({type(result).__name__}: {result})  {prompt}")
    ok = all(isinstance(result, GeneratedImage) for result in results.values())
    print(f"ran under trio {trio.__version__}")
    return 0 if ok else 1


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Generate images under trio.")
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("-o", "--output-dir", default="out")
    parser.add_argument("--model", default="flux-2-klein-4b")
    parser.add_argument("--fake", action="store_true", help="use the bundled fake API")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(trio.run(main, parse()))
