"""genpi: internalize a long, fixed LLM prompt into a small QLoRA adapter (GenPI)."""

__version__ = "0.1.0"


class InputError(ValueError):
    """Bad input from the user (catalog, folder, query): the CLI prints it on one line and exits with status 2."""
