"""Slurm fixture: a real two-node Slurm on this machine (slurm/local-cluster.sh).

The session fixture ``slurm_cluster`` uses a running local cluster, or starts one when the tests run
as root on a machine with apt-get (CI); otherwise the Slurm tests skip and say why. Test jobs are
only ever submitted to the local test cluster (ClusterName=scaleforge-local), never to a real one.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "slurm" / "local-cluster.sh"
LOCAL_CLUSTER_NAME = "scaleforge-local"


SLURM_CONF = Path("/etc/slurm/slurm.conf")
MARKER = "# Written by scaleforge slurm/local-cluster.sh"
CTLD_PIDFILE = Path("/var/run/slurm/slurmctld.pid")


def _configured_cluster_name() -> str | None:
    """ClusterName from scontrol (also covers configless clusters); None when no controller answers."""
    if shutil.which("scontrol") is None:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return None
    for line in out.stdout.splitlines() if out.returncode == 0 else []:
        key, _, value = line.partition("=")
        if key.strip() == "ClusterName":
            return value.strip()
    return None


def _local_cluster_running() -> bool:
    try:
        os.kill(int(CTLD_PIDFILE.read_text().strip()), 0)
        return True
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local two-node cluster (n1, n2): started for this session (and stopped after) when needed."""
    if SLURM_CONF.exists() and MARKER not in SLURM_CONF.read_text(errors="replace"):
        pytest.skip(f"{SLURM_CONF} belongs to a real Slurm installation; the tests only submit to the "
                    f"local test cluster ({LOCAL_CLUSTER_NAME}, slurm/local-cluster.sh)")
    if not SLURM_CONF.exists():
        name = _configured_cluster_name()  # a configless real cluster has no local slurm.conf
        if name is not None and name != LOCAL_CLUSTER_NAME:
            pytest.skip(f"a Slurm cluster named {name!r} answers here; the tests only submit to the local "
                        f"test cluster ({LOCAL_CLUSTER_NAME})")
    was_running = _local_cluster_running()
    if os.geteuid() != 0:
        if was_running:
            yield
            return
        pytest.skip("no local Slurm running and not root: start one with `sudo slurm/local-cluster.sh start`")
    if not Path("/usr/sbin/slurmctld").exists() and shutil.which("apt-get") is None:
        pytest.skip("no local Slurm and no apt-get to install one (slurm/local-cluster.sh needs Debian/Ubuntu)")
    # Idempotent: with the cluster up this only checks that both nodes are idle.
    proc = subprocess.run([str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"slurm/local-cluster.sh start failed:\n{proc.stdout}\n{proc.stderr}")
    yield
    if not was_running:
        subprocess.run([str(CLUSTER_SCRIPT), "stop"], capture_output=True, text=True, timeout=120)
