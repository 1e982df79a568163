"""Evaluation: fidelity without the prompt, prompt leakage (genpi/eval/run.py)."""

import sys

from genpi.eval.run import main

if __name__ == "__main__":
    sys.exit(main())
