"""The same client under trio: a few images generated concurrently in a nursery.

    pip install trio
    export BFL_API_KEY=...                  # from https://dashboard.bfl.ai
    python examples/trio_example.py "a red fox" "a lighthouse" "a teapot" -o out/

bfl_async is built on anyio, so nothing changes but the event loop. Add --fake to run
against the fake API bundled with bfl_async: no key, no cost.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from bfl_async import AsyncBFL, Backoff, BFLError, GeneratedImage, MissingAPIKeyError
from bfl_async.testing import FakeBFL


@asynccontextmanager
async def connect(fake: bool) -> AsyncIterator[AsyncBFL]:
    """A client of BFL's API (key from BFL_API_KEY) or, with `fake`, of a local FakeBFL."""
    if not fake:
        async with AsyncBFL() as client:
            yield client
        return
    # The fake's tasks take about a second, like `bfl --fake`; BFL_FAKE_TIME_SCALE scales that.
    scale = float(os.environ.get("BFL_FAKE_TIME_SCALE", "1"))
    async with (
        FakeBFL(generation_time=1.0, time_scale=scale) as server,
        AsyncBFL(
            server.api_key,
            base_url=server.base_url,
            poll_schedule=Backoff(initial=0.05, maximum=0.5),  # fake tasks are quick
        ) as client,
    ):
        yield client


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
        async with connect(args.fake) as client, trio.open_nursery() as nursery:
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
