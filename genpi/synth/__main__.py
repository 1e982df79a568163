import sys

from genpi.synth.run import main

if __name__ == "__main__":  # vLLM and Ray spawn processes that re-import the entry module
    sys.exit(main())
