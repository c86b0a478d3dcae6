"""Test setup: 8 simulated CPU devices (set before JAX starts) and small, fast training configs."""

import os

# Optimization level 0 halves XLA:CPU compile times; the tests are compile-bound, not compute-bound.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import gin  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "lm", "tiny.gin")

# Bindings that keep a tiny run to seconds: short shuffle buffer, one eval batch, no warmup wait.
FAST = [
    "jsonl_lm_task.shuffle_buffer_size = 64",
    "DataConfig.eval_batches = 1",
    "TrainConfig.progress_bar = False",
    "SEQ_LEN = 64",
]


@pytest.fixture
def tiny_config():
    """Parses the tiny LM config plus FAST; returns a function to add more bindings."""
    from safejax import config

    def parse(*bindings):
        config.parse([TINY], FAST + list(bindings))

    parse()
    return parse


@pytest.fixture(scope="module", autouse=True)
def _fresh_gin_bindings():
    """Each test file starts with no gin bindings: under pytest-xdist a worker runs files in no
    fixed order, so what one file bound must not reach the next."""
    gin.clear_config()
