"""The warm ClientApp worker is pinned to the Flower release it mirrors (issue 24, finding 11).

It uses non-public Flower modules, Runtime API RPCs and copies of Flower functions: on any
other Flower version the worker and the node supervisor refuse to start, with one line naming
the fallback (``--clientapp subprocess``); and if the installed Flower's originals of the
mirrored functions change (a patched or re-released Flower under the same version), the
recorded digests no longer match and this test fails, so the copies get re-read.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import textwrap

import pytest

from fedpeft.deploy import clientapp_worker as W
from fedpeft.deploy import node


def _ast_digest(ref: str) -> str:
    module, name = ref.split(":")
    src = textwrap.dedent(inspect.getsource(getattr(importlib.import_module(module), name)))
    return hashlib.sha256(ast.dump(ast.parse(src)).encode()).hexdigest()


def test_installed_flower_is_the_tested_one_and_its_mirrored_functions_did_not_drift() -> None:
    assert W.installed_flower() == W.TESTED_FLOWER
    assert W.flower_version_problem() is None
    drifted = {ref for ref, digest in W.MIRRORED.items() if _ast_digest(ref) != digest}
    assert not drifted, f"Flower changed what the worker copies: re-read and update {sorted(drifted)}"


def test_every_flower_internal_and_rpc_the_worker_uses_still_exists() -> None:
    for module in W.FLOWER_INTERNALS:
        importlib.import_module(module)
    from flwr.supercore.runtime import RuntimeHttpClient

    missing = [rpc for rpc in W.RUNTIME_RPCS if not callable(getattr(RuntimeHttpClient, rpc, None))]
    assert not missing
    # the worker's own imports name only modules on the list (or Flower's public API)
    src = inspect.getsource(W)
    used = {n.module for n in ast.walk(ast.parse(src))
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("flwr.")}
    public = {"flwr.app", "flwr.common"}
    assert used - public <= set(W.FLOWER_INTERNALS), used - public - set(W.FLOWER_INTERNALS)


@pytest.mark.parametrize("entry", ["worker", "node"])
def test_an_untested_flower_is_refused_with_one_line_naming_the_subprocess_fallback(
        entry, monkeypatch, capsys) -> None:
    monkeypatch.setattr(W, "installed_flower", lambda: "1.43.0")
    if entry == "worker":
        code = W.main(["--runtime-api-address", "127.0.0.1:1", "--no-preload"])
    else:
        started = []
        monkeypatch.setattr(node.subprocess, "Popen", lambda *a, **k: started.append(a))
        code = node.main(["--runtime-api-address", "127.0.0.1:1", "--",
                          "flower-supernode", "--isolation", "process"])
        assert not started  # neither the SuperNode nor a worker was launched
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "1.43.0" in err[0] and W.TESTED_FLOWER in err[0] and "--clientapp subprocess" in err[0]
