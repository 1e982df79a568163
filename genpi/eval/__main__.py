import sys

from genpi.eval.fidelity import main

if __name__ == "__main__":
    sys.exit(main())
