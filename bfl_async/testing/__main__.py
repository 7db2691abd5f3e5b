"""`python -m bfl_async.testing`: run a FakeBFL in its own process until Ctrl-C.

It prints `api URL`, `polling URL` and `delivery URL`, one a line, once it listens.
"""

from __future__ import annotations

import argparse
import functools
import sys

import anyio

from ._fake import run_fake_server


def _limit(text: str) -> tuple[str, int]:
    pool, _, value = text.partition("=")
    return pool, int(value)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(prog="python -m bfl_async.testing", description=__doc__)
    parser.add_argument("--api-key", default="fake-key")
    parser.add_argument("--api-port", type=int, default=0)
    parser.add_argument("--polling-port", type=int, default=0)
    parser.add_argument("--delivery-port", type=int, default=0)
    parser.add_argument("--generation-time", type=float, default=0.05, help="seconds per task")
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--result-ttl", type=float, default=600.0)
    parser.add_argument("--credits", type=float, default=1000.0)
    parser.add_argument("--image-bytes", type=int, default=None, help="pad images to this size")
    parser.add_argument(
        "--limit",
        type=_limit,
        action="append",
        default=[],
        metavar="POOL=N",
        help="an in-flight limit, e.g. standard=24 (repeatable)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    args = parser.parse_args(argv)
    serve = functools.partial(
        run_fake_server,
        api_key=args.api_key,
        api_port=args.api_port,
        polling_port=args.polling_port,
        delivery_port=args.delivery_port,
        generation_time=args.generation_time,
        time_scale=args.time_scale,
        result_ttl=args.result_ttl,
        credits=args.credits,
        image_bytes=args.image_bytes,
        limits=dict(args.limit),
        seed=args.seed,
    )
    try:
        anyio.run(serve, backend=args.backend)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
