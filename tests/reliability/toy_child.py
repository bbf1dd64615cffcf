"""The toy training of examples/toy_training.py with the fault injection of CH_FAULT installed."""

import os
import runpy
import sys

from tests.reliability import faults

faults.install()
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.argv[0] = os.path.join(ROOT, "examples", "toy_training.py")
runpy.run_path(sys.argv[0], run_name="__main__")
