"""Torch threads per client message, and the CLI's OpenMP wait policy (fedpeft/threads.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fedpeft.config import RunConfig
from fedpeft.threads import client_threads, process_cores


@pytest.mark.parametrize("cpus, expected", [(1.0, 1), (2.0, 2), (0.5, 1), (3.7, 3)])
def test_a_ray_or_deployed_client_gets_the_cpus_reserved_for_it(cpus, expected):
    assert client_threads(RunConfig(backend="ray", cpus_per_client=cpus)) == expected


def test_an_inprocess_client_gets_every_core_of_the_process():
    assert process_cores() == len(os.sched_getaffinity(0))
    assert client_threads(RunConfig(backend="inprocess", cpus_per_client=1.0)) == len(os.sched_getaffinity(0))


def _cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return {**env, **extra}


PROBE = ("import os, sys; import fedpeft.cli; loaded = 'torch' in sys.modules; import torch; "
         "print(loaded, os.environ.get('OMP_WAIT_POLICY'))")


def test_the_cli_makes_idle_openmp_threads_sleep_before_torch_loads():
    # libgomp reads OMP_WAIT_POLICY once, when torch loads it: the CLI must set it first
    out = subprocess.run([sys.executable, "-c", PROBE], env=_cli_env(), capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "PASSIVE"]


def test_a_users_own_wait_policy_wins():
    out = subprocess.run([sys.executable, "-c", PROBE], env=_cli_env(OMP_WAIT_POLICY="ACTIVE"),
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "ACTIVE"]
