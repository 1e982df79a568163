"""genpi: internalize a long, fixed LLM prompt into a small QLoRA adapter (GenPI)."""

__version__ = "0.1.0"


class InputError(ValueError):
    """Bad input from the user (catalog, folder, query): the CLI prints it on one line and exits with status 2."""


def exits_2_on_input_error(main):
    """The one InputError handler of every entry point (`genpi`, `genpi run`, `python -m genpi.synth`, ...):
    `main(argv)` with bad input prints `genpi: error: MESSAGE` on one line and returns 2."""
    import functools
    import sys

    @functools.wraps(main)
    def guarded(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except InputError as e:
            print(f"genpi: error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
            return 2

    return guarded
