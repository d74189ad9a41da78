"""How PyTorch's CPU threads wait, chosen before PyTorch loads.

By default the OpenMP runtime behind PyTorch's CPU kernels lets a thread that waits for the
others spin, busy, for a while. On a machine whose cores other programs share (a workstation
running Slicer, a CI runner, a shared server) those spinning threads compete with the threads
they wait for: on the project's 2-core machine, with other jobs running, a source-training
iteration took 4.6-7.0 s with the runtime's default and 1.2 s with sleeping threads, a
diffusion-training iteration 5.8-10.6 s and 2.0 s (``python Testing/benchmarks/bench_training.py
--wait-policies``; see the README). This module has no PyTorch import: it must run before
PyTorch is imported, as the OpenMP runtime reads its settings when it loads.
"""

from __future__ import annotations

import os

WAIT_POLICY_VARIABLE = "OMP_WAIT_POLICY"


def prefer_sleeping_threads() -> bool:
    """Make waiting OpenMP threads sleep (``OMP_WAIT_POLICY=PASSIVE``) unless the user set a policy.

    Returns:
        True when the policy was set here, False when the environment already had one (then it
        is left as it is).
    """
    if WAIT_POLICY_VARIABLE in os.environ:
        return False
    os.environ[WAIT_POLICY_VARIABLE] = "PASSIVE"
    return True
