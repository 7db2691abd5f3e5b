"""Generate many images at once with asyncio.gather, with a live progress bar.

    export BFL_API_KEY=...                  # from https://dashboard.bfl.ai
    python examples/gather_batch.py -o out/                # twelve built-in prompts
    python examples/gather_batch.py prompts.txt -o out/    # one prompt per line

Every call runs at once; the client keeps the account's in-flight limit (24 tasks), so the
bar moves in waves. One failed image does not stop the others. Add --fake to run against
the fake API bundled with bfl_async: no key, no cost.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bfl_async import AsyncBFL, BFLError, GeneratedImage, MissingAPIKeyError
from bfl_async.testing import fake_client

PROMPTS = [
    "a red fox in fresh snow at dawn, telephoto",
    "a lighthouse on a basalt cliff in a storm, oil painting",
    "isometric cutaway of a tiny bakery, warm light",
    "a paper boat on a rain puddle, macro photo",
    "a city floating above the clouds, 1970s paperback cover",
    "watercolor map of an imaginary archipelago",
    "a hummingbird drinking from a fuchsia flower",
    "a cozy reading nook with a sleeping cat, golden hour",
    "product shot of a ceramic teapot on linen",
    "a minimalist poster of a mountain range at night",
    "pixel art of a knight resting by a campfire",
    "an astronaut tending a greenhouse on Mars, cinematic",
]


async def generate_all(
    client: AsyncBFL, prompts: list[str], model: str, output_dir: Path
) -> list[GeneratedImage | BFLError]:
    """Every prompt at once; each entry is the image or the error that ended that job."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        bar = progress.add_task("images", total=len(prompts), failed=0)
        failed = 0

        async def one(prompt: str) -> GeneratedImage | BFLError:
            nonlocal failed
            try:
                return await client.generate(model, prompt=prompt, output_dir=output_dir)
            except BFLError as exc:  # this job failed; the others go on
                failed += 1
                return exc
            finally:
                progress.update(bar, advance=1, failed=failed)

        return await asyncio.gather(*(one(prompt) for prompt in prompts))


async def main(args: argparse.Namespace) -> int:
    prompts: list[str] = args.prompts
    try:
        async with fake_client() if args.fake else AsyncBFL() as client:
            results = await generate_all(client, prompts, args.model, Path(args.output_dir))
    except MissingAPIKeyError as exc:
        print(f"error: {exc}\n(or add --fake to try it without a key)", file=sys.stderr)
        return 2
    images = [r for r in results if isinstance(r, GeneratedImage)]
    for prompt, result in zip(prompts, results, strict=True):
        if isinstance(result, GeneratedImage):
            print(f"{result.path}  {prompt}")
        else:
            print(f"FAILED ({type(result).__name__}: {result})  {prompt}")
    spent = sum(image.cost or 0.0 for image in images)
    print(f"{len(images)} of {len(prompts)} images saved, {spent:g} credits")
    return 0 if len(images) == len(prompts) else 1


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Generate many images at once.")
    parser.add_argument("prompts", nargs="?", help="a text file, one prompt per line")
    parser.add_argument("-o", "--output-dir", default="out")
    parser.add_argument("--model", default="flux-2-klein-4b")
    parser.add_argument("--fake", action="store_true", help="use the bundled fake API")
    args = parser.parse_args(argv)
    if args.prompts is None:
        args.prompts = PROMPTS
    else:
        lines = Path(args.prompts).read_text(encoding="utf-8").splitlines()
        args.prompts = [line.strip() for line in lines if line.strip()]
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
