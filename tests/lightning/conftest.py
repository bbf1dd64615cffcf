import logging
import os
import warnings

import pytest

os.environ.setdefault("PL_DISABLE_FORK", "1")
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")


@pytest.fixture(autouse=True)
def _quiet():
    for name in ("lightning.pytorch", "pytorch_lightning", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    yield


@pytest.fixture(params=["lightning.pytorch", "pytorch_lightning"])
def L(request):
    return __import__(request.param, fromlist=["Trainer"])
