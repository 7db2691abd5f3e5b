"""`bfl`: the command line of bfl_async, a thin client of its public API.

    bfl generate flux-2-pro "a red fox" -o out/
    bfl wait '<task JSON>' -o out/      # the image of a task already paid for
    bfl batch jobs.jsonl -o out/        # live progress, results.jsonl
    bfl estimate jobs.jsonl             # what it will cost
    bfl models | bfl credits | bfl fake-server

`--fake` runs generate, batch and credits against a FakeBFL in the same process; the
BFL_FAKE_TIME_SCALE variable scales its generation times (tests set it low).
"""

from ._app import app, main

__all__ = ["app", "main"]
