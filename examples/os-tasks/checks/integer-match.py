# argv[1]: the agent's answer; argv[2]: the example script's output (the gold value)
import sys

try:
    sys.exit(0 if int(sys.argv[1].strip()) == int(sys.argv[2].strip()) else 1)
except ValueError:
    sys.exit(1)
