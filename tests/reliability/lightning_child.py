"""tests/lightning/train_script.py with the fault injection of CH_FAULT installed."""

from tests.lightning import train_script
from tests.reliability import faults

faults.install()
train_script.main()
