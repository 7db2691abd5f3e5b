"""`python -m bfl_async.cli`: the `bfl` command."""

from ._app import main

if __name__ == "__main__":
    main()
