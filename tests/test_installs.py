"""The accelerator extras of setup.py install builds of the jax this environment runs: safejax[tpu]
pins jax[tpu] at the installed jax and the libtpu that jax's own `tpu` extra names; safejax[cuda]
pins jax[cuda12] and the CUDA plugin of that same jax version."""

import ast
import importlib.metadata
import os

import pytest
from packaging.requirements import Requirement

from conftest import REPO


def setup_extras() -> dict[str, list[Requirement]]:
    tree = ast.parse(open(os.path.join(REPO, "setup.py"), encoding="utf-8").read())
    (call,) = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup"]
    (extras,) = [k.value for k in call.keywords if k.arg == "extras_require"]
    return {name: [Requirement(r) for r in reqs] for name, reqs in ast.literal_eval(extras).items()}


def jax_extra(extra: str) -> dict[str, Requirement]:
    """What the installed jax's own extra requires, by package name."""
    out = {}
    for line in importlib.metadata.requires("jax"):
        req = Requirement(line)
        if req.marker and req.marker.evaluate({"extra": extra}) and not req.marker.evaluate({"extra": ""}):
            out[req.name] = req
    return out


@pytest.mark.parametrize("extra,jax_extra_name,companion", [
    ("tpu", "tpu", "libtpu"),
    ("cuda", "cuda12", "jax-cuda12-plugin"),
])
def test_accelerator_extra_matches_the_installed_jax(extra, jax_extra_name, companion):
    installed = importlib.metadata.version("jax")
    reqs = {r.name: r for r in setup_extras()[extra]}
    assert set(reqs) == {"jax", companion}
    assert reqs["jax"].extras == {jax_extra_name}
    assert str(reqs["jax"].specifier) == f"=={installed}"  # the build of the jax the tests run
    declared = jax_extra(jax_extra_name)[companion]
    (pin,) = list(reqs[companion].specifier)  # one pin, the one jax itself asks for
    if pin.version.endswith(".*"):
        assert str(declared.specifier) == str(pin)
    else:
        assert pin.operator == "==" and declared.specifier.contains(pin.version)
    assert reqs[companion].extras == declared.extras
