"""genpi: internalize a long, fixed LLM prompt into a small QLoRA adapter (GenPI)."""


def _version() -> str:
    """The version `genpi --version` shows: in a source checkout (pyproject.toml beside the package: an editable
    install, or PYTHONPATH) the checkout's own, which an editable install's recorded metadata may lag behind; else
    the installed distribution's (importlib.metadata); "0+unknown" when neither is there."""
    import importlib.metadata
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
        if project.get("name") == "genpi" and project.get("version"):
            return project["version"]
    except (OSError, ValueError):  # no checkout here (an installed wheel), or not a readable pyproject
        pass
    try:
        return importlib.metadata.version("genpi")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


__version__ = _version()


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
