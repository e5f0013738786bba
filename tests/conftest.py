"""Shared test settings: one CPU thread (the CI machines have two cores) and a seeded RNG."""
import random

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def seed() -> int:
    """Seed python, numpy and torch with 0 and return the seed."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    return 0
