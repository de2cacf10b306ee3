"""sbatch rendering, rendezvous from a Slurm environment, submission errors: no cluster needed."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _slurm_testing import make_cfg
from scaleforge.launch import slurm
from scaleforge.platform.config import ConfigError


def directives(script: str) -> list[str]:
    return [line[len("#SBATCH "):] for line in script.splitlines() if line.startswith("#SBATCH ")]


def directive_map(script: str) -> dict[str, str]:
    out = {}
    for d in directives(script):
        key, _, value = d.partition("=")
        out[key] = value
    return out


def render(tmp_path, **cluster) -> tuple[str, Path]:
    cfg = make_cfg("my/run:1", tmp_path / "runs", **cluster)
    run_dir = tmp_path / "runs" / "my/run:1"
    return slurm.render_sbatch(cfg, run_dir, run_dir / "config.yaml"), run_dir


def test_render_has_required_directives(tmp_path):
    script, run_dir = render(
        tmp_path, nodes=4, procs_per_node=8, gpus_per_node=8, cpus_per_task=96, partition="gpu",
        account="proj1", qos="high", time_limit="1-02:00:00", preempt_grace_s=300, mem="0",
        constraint="h100", extra_sbatch=["--exclusive", "#SBATCH --comment=scaleforge"],
        env={"NCCL_DEBUG": "WARN", "WEIRD": "a b'c"},
    )
    d = directive_map(script)
    assert d["--job-name"] == "my_run_1"
    assert d["--nodes"] == "4"
    assert d["--ntasks-per-node"] == "1"  # one launcher per node; torch.distributed.run forks the 8
    assert d["--gpus-per-node"] == "8"
    assert d["--cpus-per-task"] == "96"
    assert (d["--partition"], d["--account"], d["--qos"]) == ("gpu", "proj1", "high")
    assert (d["--time"], d["--mem"], d["--constraint"]) == ("1-02:00:00", "0", "h100")
    assert d["--signal"] == "B:USR1@300"
    assert "--requeue" in d and "--no-requeue" not in d
    assert d["--open-mode"] == "append"
    assert d["--output"] == d["--error"] == f"{run_dir}/slurm-%j.out"
    assert "--exclusive" in d and d["--comment"] == "scaleforge"
    # sbatch stops reading directives at the first command: all must come before it.
    body = script.splitlines()
    first_cmd = next(i for i, l in enumerate(body) if l.strip() and not l.startswith("#"))
    assert all(i < first_cmd for i, l in enumerate(body) if l.startswith("#SBATCH"))
    # One srun task per node running the launcher with the saved config, same interpreter.
    srun = next(l for l in body if l.startswith("srun "))
    assert "--ntasks-per-node=1" in srun and "--nodes=4" in srun and "--cpus-per-task=96" in srun
    launch_line = body[body.index(srun) + 1]
    assert launch_line.split()[:3] == [sys.executable, "-m", "scaleforge.launch.cli"]
    assert "--from-slurm" in launch_line
    assert "--config" in launch_line and "config.yaml" in launch_line
    assert "export NCCL_DEBUG=WARN" in script and "export WEIRD='a b'\"'\"'c'" in script
    assert f"export PYTHONPATH={slurm.REPO_ROOT}" in script
    assert "scontrol requeue" in script and "MAX_REQUEUES=20" in script


def test_rendered_script_is_valid_bash_and_exports_env(tmp_path):
    script, _ = render(tmp_path, env={"WEIRD": "a b'c $HOME"})
    path = tmp_path / "s.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    # The env block, run by bash on its own, sets the value byte for byte (quoting is right).
    env_lines = [l for l in script.splitlines() if l.startswith("export WEIRD=")]
    out = subprocess.run(["bash", "-c", env_lines[0] + '; printf %s "$WEIRD"'], capture_output=True, text=True)
    assert out.stdout == "a b'c $HOME"


def test_whitespace_in_run_dir_is_rejected(tmp_path):
    cfg = make_cfg("my run", tmp_path)
    with pytest.raises(ConfigError, match="run directory .*my run.* contains whitespace"):
        slurm.render_sbatch(cfg, tmp_path / "my run", tmp_path / "my run" / "config.yaml")


def test_render_without_requeue_and_optional_fields(tmp_path):
    script, _ = render(tmp_path, requeue=False)
    d = directive_map(script)
    assert "--no-requeue" in d and "--requeue" not in d
    assert d["--signal"] == "B:USR1@120"  # still checkpoints before the time limit
    for key in ("--partition", "--account", "--qos", "--mem", "--constraint", "--gpus-per-node", "--cpus-per-task"):
        assert key not in d
    assert "scontrol requeue" not in script


@pytest.mark.parametrize(
    "cluster, key",
    [
        ({"nodes": 0}, "cluster.nodes"),
        ({"procs_per_node": 0}, "cluster.procs_per_node"),
        ({"gpus_per_node": 4, "procs_per_node": 8}, "cluster.procs_per_node"),
        ({"time_limit": "2h"}, "cluster.time_limit"),
        ({"time_limit": "00:01:00", "preempt_grace_s": 120}, "cluster.preempt_grace_s"),
        ({"partition": "gpu debug"}, "cluster.partition"),
        ({"extra_sbatch": ["exclusive"]}, "cluster.extra_sbatch[0]"),
        ({"extra_sbatch": ["--a\n#SBATCH --b"]}, "cluster.extra_sbatch[0]"),
        ({"env": {"1BAD": "x"}}, "cluster.env.1BAD"),
        ({"max_requeues": -1}, "cluster.max_requeues"),
    ],
)
def test_bad_cluster_config_names_the_key(tmp_path, cluster, key):
    with pytest.raises(ConfigError, match="^" + re.escape(key)):
        render(tmp_path, **cluster)


@pytest.mark.parametrize(
    "value, seconds",
    [("30", 1800), ("10:05", 605), ("01:00:00", 3600), ("2-00", 172800), ("1-02:03", 93780),
     ("1-02:03:04", 93784), ("UNLIMITED", None)],
)
def test_time_limit_formats(value, seconds):
    assert slurm.time_limit_seconds(value) == seconds


def fake_env(**over):
    env = {"SLURM_JOB_ID": "123457", "SLURM_JOB_NODELIST": "gpu-[007-009,012]", "SLURM_NNODES": "4",
           "SLURM_NODEID": "2"}
    env.update(over)
    return env


def test_rendezvous_from_fake_slurm_env():
    rdzv = slurm.rendezvous_from_env(fake_env())
    assert rdzv == {"nnodes": 4, "node_rank": 2, "master_addr": "gpu-007", "master_port": 20000 + 123457 % 20000}
    # Node rank follows SLURM_NODEID; every node agrees on the endpoint.
    others = [slurm.rendezvous_from_env(fake_env(SLURM_NODEID=str(r))) for r in range(4)]
    assert [o["node_rank"] for o in others] == [0, 1, 2, 3]
    assert {(o["master_addr"], o["master_port"]) for o in others} == {("gpu-007", 23457)}
    # The alternative variable names that some Slurm versions set.
    alt = {"SLURM_JOBID": "5", "SLURM_NODELIST": "a1,b2", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1"}
    assert slurm.rendezvous_from_env(alt) == {"nnodes": 2, "node_rank": 1, "master_addr": "a1", "master_port": 20005}


@pytest.mark.parametrize(
    "env, message",
    [
        ({"SLURM_NODEID": ""}, "SLURM_NODEID is not set"),
        ({"SLURM_NODEID": "4"}, "outside the job's 4 nodes"),
        ({"SLURM_NNODES": "3"}, "has 4 hosts but SLURM_NNODES=3"),
        ({"SLURM_JOB_ID": "abc"}, "SLURM_JOB_ID='abc' is not an integer"),
    ],
)
def test_rendezvous_errors(env, message):
    with pytest.raises(slurm.SlurmError, match=message):
        slurm.rendezvous_from_env(fake_env(**env))


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("n[1-2]", ["n1", "n2"]),
        ("node7", ["node7"]),
        ("gpu-[007-009,012]", ["gpu-007", "gpu-008", "gpu-009", "gpu-012"]),
        ("a[1-2],b[08-10]", ["a1", "a2", "b08", "b09", "b10"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ],
)
def test_hostlist_expansion(nodelist, hosts):
    assert slurm.expand_hostlist(nodelist) == hosts
    if shutil.which("scontrol"):  # the fallback agrees with Slurm's own expansion
        assert slurm.hostnames(nodelist) == hosts


def test_submit_errors(tmp_path, monkeypatch):
    script, _ = render(tmp_path)
    path = tmp_path / "job.sh"
    path.write_text(script)
    with pytest.raises(slurm.SlurmError, match="does not exist"):
        slurm.submit(tmp_path / "missing.sh")
    if shutil.which("sbatch"):
        # A real sbatch refusal (no '#!' line), reported with sbatch's own message.
        bad = tmp_path / "bad.sh"
        bad.write_text("echo no shebang\n")
        with pytest.raises(slurm.SlurmError, match=r"sbatch .*bad.sh failed \(exit \d+\): .*script"):
            slurm.submit(bad)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(slurm.SlurmError, match="sbatch not found on PATH"):
        slurm.submit(path)
