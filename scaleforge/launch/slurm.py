"""Slurm submission: render the sbatch script, submit it, and find the rendezvous inside the job.

Flow (docs/slurm.md):

1. ``launch --config X --slurm`` saves the resolved config as ``<run_dir>/config.yaml``, then
   :func:`render_sbatch` renders ``slurm/sbatch.sh.j2`` into ``<run_dir>/job.sbatch`` and :func:`submit` runs
   ``sbatch`` on it; ``--dry-run`` prints the script and the launcher's plan instead.
2. In the job, one ``srun`` task per node runs
   ``python -m scaleforge.launch.cli --config <run_dir>/config.yaml --from-slurm``; that process calls
   :func:`rendezvous_from_env` and starts ``torch.distributed.run`` for its node.
3. Preemption: the script asks for ``--signal=B:USR1@<cluster.preempt_grace_s>``; on USR1 it touches
   ``<run_dir>/PREEMPT`` (:data:`PREEMPT_FILE`), waits for the trainer to checkpoint and exit 0, and
   then runs ``scontrol requeue`` (at most ``cluster.max_requeues`` times, counted by Slurm in
   ``SLURM_RESTART_COUNT``). A ``<run_dir>/DONE`` file (:data:`DONE_FILE`) written by the trainer
   at the end of training stops a late requeue.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

if TYPE_CHECKING:
    from scaleforge.platform.config import JobConfig

# Imported lazily (jinja2, scaleforge.platform.config -> torch): the in-job helpers
# (rendezvous_from_env) stay cheap to import for a per-node process.

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = REPO_ROOT / "slurm" / "sbatch.sh.j2"
SCRIPT_NAME = "job.sbatch"  # what launch --slurm writes into the run directory
PREEMPT_FILE = "PREEMPT"  # touched by the batch script on USR1; the trainer polls it every step
DONE_FILE = "DONE"  # written by the trainer when the run reached trainer.max_steps
PORT_BASE = 20000
PORT_SPAN = 20000

# Slurm's --time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or UNLIMITED.
_TIME_RE = re.compile(
    r"^(?:\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+(?::\d{1,2}(?::\d{1,2})?)?|UNLIMITED|INFINITE)$"
)
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SlurmError(RuntimeError):
    """sbatch/scontrol missing or failing, or a Slurm environment that is not what a job provides."""


@dataclass(frozen=True)
class SubmittedJob:
    job_id: str
    script_path: Path
    log_path: Path  # one log for every restart of the job (--open-mode=append)
    run_dir: Path


# ---------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------
def time_limit_seconds(value: str) -> Optional[int]:
    """Seconds in a Slurm --time value (None for UNLIMITED). Raises ConfigError on a bad format."""
    from scaleforge.platform.config import ConfigError

    v = str(value).strip()
    if not _TIME_RE.match(v):
        raise ConfigError(
            f"cluster.time_limit: {value!r} is not a Slurm time (minutes, MM:SS, HH:MM:SS, D-HH, "
            f"D-HH:MM or D-HH:MM:SS)"
        )
    if v in ("UNLIMITED", "INFINITE"):
        return None
    days = 0
    if "-" in v:
        d, v = v.split("-", 1)
        days = int(d)
        parts = [int(x) for x in v.split(":")]
        parts += [0] * (3 - len(parts))  # D-HH[:MM[:SS]]
        h, m, s = parts
    else:
        parts = [int(x) for x in v.split(":")]
        if len(parts) == 1:
            h, m, s = 0, parts[0], 0  # plain minutes
        elif len(parts) == 2:
            h, m, s = 0, parts[0], parts[1]
        else:
            h, m, s = parts
    return ((days * 24 + h) * 60 + m) * 60 + s


def _check_cluster(cfg: JobConfig) -> None:
    from scaleforge.platform.config import ConfigError

    c = cfg.cluster
    if c.nodes < 1:
        raise ConfigError(f"cluster.nodes: must be >= 1, got {c.nodes}")
    if c.procs_per_node < 1:
        raise ConfigError(f"cluster.procs_per_node: must be >= 1, got {c.procs_per_node}")
    for key in ("gpus_per_node", "cpus_per_task", "preempt_grace_s", "max_requeues"):
        if getattr(c, key) < 0:
            raise ConfigError(f"cluster.{key}: must be >= 0, got {getattr(c, key)}")
    if c.gpus_per_node and c.procs_per_node > c.gpus_per_node:
        raise ConfigError(
            f"cluster.procs_per_node={c.procs_per_node} exceeds cluster.gpus_per_node={c.gpus_per_node}: "
            f"each process drives one GPU"
        )
    limit = time_limit_seconds(c.time_limit)
    if limit is not None and c.preempt_grace_s >= limit:
        raise ConfigError(
            f"cluster.preempt_grace_s={c.preempt_grace_s} must be shorter than cluster.time_limit="
            f"{c.time_limit!r} ({limit} s), or the preemption signal would come at the start"
        )
    for key in ("partition", "account", "qos", "mem", "constraint"):
        value = getattr(c, key)
        if value is not None and (not str(value).strip() or re.search(r"\s", str(value))):
            raise ConfigError(f"cluster.{key}: {value!r} must be one word without spaces")
    for i, line in enumerate(c.extra_sbatch):
        if "\n" in line or not _strip_sbatch(line).startswith("-"):
            raise ConfigError(
                f"cluster.extra_sbatch[{i}]: {line!r} must be one sbatch option such as '--exclusive'"
            )
    for key, value in c.env.items():
        if not _ENV_KEY_RE.match(str(key)):
            raise ConfigError(f"cluster.env.{key}: not a valid environment variable name")
        if "\n" in str(value):
            raise ConfigError(f"cluster.env.{key}: the value must be one line")
    if "\n" in cfg.run.name or not cfg.run.name.strip():
        raise ConfigError(f"run.name: {cfg.run.name!r} is not usable as a Slurm job name")


def _strip_sbatch(line: str) -> str:
    line = line.strip()
    return line[len("#SBATCH"):].strip() if line.startswith("#SBATCH") else line


def default_command(config_path: Path) -> list[str]:
    """What each node's srun task runs: the launcher, which starts torch.distributed.run there."""
    return [sys.executable, "-m", "scaleforge.launch.cli", "--config", str(config_path), "--from-slurm"]


def render_sbatch(
    cfg: JobConfig,
    run_dir: Path,
    config_path: Path,
    *,
    command: Optional[Sequence[str]] = None,
    template: Path = TEMPLATE,
) -> str:
    """The sbatch script for ``cfg`` (cluster section), writing logs into ``run_dir``.

    ``command`` replaces the per-node launcher command (default :func:`default_command`); the tests use
    it to run the same script around a small torch.distributed program.
    """
    import jinja2

    _check_cluster(cfg)
    c = cfg.cluster
    run_dir = Path(run_dir).absolute()
    config_path = Path(config_path).absolute()
    workdir = Path.cwd()
    # sbatch splits #SBATCH lines on whitespace: paths in directives must not contain any.
    for what, path in (("the run directory (run.output_dir/run.name)", run_dir),
                       ("the working directory", workdir)):
        if re.search(r"\s", str(path)):
            from scaleforge.platform.config import ConfigError

            raise ConfigError(f"{what} {str(path)!r} contains whitespace, which #SBATCH lines cannot carry")
    if not template.is_file():
        raise SlurmError(f"sbatch template {template} not found (it ships in the repository's slurm/)")
    venv = sys.prefix if sys.prefix != sys.base_prefix else None
    pythonpath = str(REPO_ROOT)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template.parent)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["q"] = lambda s: shlex.quote(str(s))
    cmd = list(command) if command is not None else default_command(config_path)
    if not cmd:
        raise SlurmError("render_sbatch: empty command")
    return env.get_template(template.name).render(
        run_name=cfg.run.name,
        job_name=re.sub(r"[^A-Za-z0-9_.+-]", "_", cfg.run.name),
        script_path=run_dir / SCRIPT_NAME,
        nodes=c.nodes,
        cpus_per_task=c.cpus_per_task,
        gpus_per_node=c.gpus_per_node,
        partition=c.partition,
        account=c.account,
        qos=c.qos,
        mem=c.mem,
        constraint=c.constraint,
        time_limit=c.time_limit,
        workdir=workdir,
        run_dir=run_dir,
        preempt_grace_s=c.preempt_grace_s,
        requeue=c.requeue,
        max_requeues=c.max_requeues,
        extra_sbatch=[_strip_sbatch(x) for x in c.extra_sbatch],
        pythonpath=pythonpath,
        venv=venv,
        env=sorted((str(k), str(v)) for k, v in c.env.items()),
        command=[shlex.quote(str(x)) for x in cmd],
    )


# ---------------------------------------------------------------------------------------------------
# Submission
# ---------------------------------------------------------------------------------------------------
def _run_slurm_tool(argv: list[str], what: str) -> subprocess.CompletedProcess:
    if shutil.which(argv[0]) is None:
        raise SlurmError(
            f"{argv[0]} not found on PATH: {what} needs the Slurm client tools (run on a login node, or "
            f"start a local cluster with slurm/local-cluster.sh start)"
        )
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(argv)} did not answer within 120 s (is slurmctld up?)") from None


def submit(script_path: Path, extra_args: Sequence[str] = ()) -> str:
    """``sbatch --parsable script`` -> job id. Raises SlurmError with sbatch's stderr on failure."""
    script_path = Path(script_path)
    if not script_path.is_file():
        raise SlurmError(f"sbatch script {script_path} does not exist")
    proc = _run_slurm_tool(["sbatch", "--parsable", *extra_args, str(script_path)], "submitting a job")
    if proc.returncode != 0:
        raise SlurmError(
            f"sbatch {script_path} failed (exit {proc.returncode}): "
            f"{proc.stderr.strip() or proc.stdout.strip()}"
        )
    out = proc.stdout.strip().splitlines()
    job_id = out[-1].split(";")[0].strip() if out else ""  # --parsable: "jobid" or "jobid;cluster"
    if not job_id.isdigit():
        raise SlurmError(f"sbatch {script_path}: unexpected output {proc.stdout!r} (no job id)")
    return job_id


def write_script(cfg: JobConfig, run_dir: Path, config_path: Path, **kwargs: Any) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / SCRIPT_NAME
    path.write_text(render_sbatch(cfg, run_dir, config_path, **kwargs))
    path.chmod(0o755)
    return path


def write_and_submit(cfg: JobConfig, run_dir: Path, config_path: Path, **kwargs: Any) -> SubmittedJob:
    """Render into ``<run_dir>/job.sbatch``, submit, and say where the log will be."""
    script = write_script(cfg, run_dir, config_path, **kwargs)
    job_id = submit(script)
    run_dir = Path(run_dir).absolute()
    return SubmittedJob(job_id, script.absolute(), run_dir / f"slurm-{job_id}.out", run_dir)


# ---------------------------------------------------------------------------------------------------
# Inside the job
# ---------------------------------------------------------------------------------------------------
def expand_hostlist(nodelist: str) -> list[str]:
    """Slurm hostlist expression -> host names (``n[1-2],gpu[01,03]`` -> n1 n2 gpu01 gpu03).

    Used only where ``scontrol`` is not installed; inside a job :func:`hostnames` asks scontrol.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        if item:
            hosts.extend(_expand_one(item))
    if not hosts:
        raise SlurmError(f"empty Slurm node list {nodelist!r}")
    return hosts


def _split_top_level(s: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise SlurmError(f"malformed Slurm node list {s!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise SlurmError(f"malformed Slurm node list {s!r}: unbalanced '['")
    parts.append("".join(cur))
    return parts


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if not m:
        return [item]
    prefix, suffix = item[: m.start()], item[m.end():]
    out = []
    for rng in m.group(1).split(","):
        if "-" in rng:
            lo, hi = rng.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise SlurmError(f"malformed range {rng!r} in Slurm node list {item!r}")
            width = len(lo)
            values = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        else:
            if not rng.isdigit():
                raise SlurmError(f"malformed entry {rng!r} in Slurm node list {item!r}")
            values = [rng]
        for v in values:
            out.extend(_expand_one(prefix + v + suffix))
    return out


def hostnames(nodelist: str) -> list[str]:
    """``scontrol show hostnames <nodelist>`` (the reference), or our expansion without scontrol."""
    if shutil.which("scontrol") is None:
        return expand_hostlist(nodelist)
    proc = _run_slurm_tool(["scontrol", "show", "hostnames", nodelist], "expanding the job's node list")
    if proc.returncode != 0:
        raise SlurmError(f"scontrol show hostnames {nodelist!r} failed: {proc.stderr.strip()}")
    hosts = proc.stdout.split()
    if not hosts:
        raise SlurmError(f"scontrol show hostnames {nodelist!r} returned no host: {proc.stderr.strip()}")
    return hosts


def master_port(job_id: int) -> int:
    """A port that differs between concurrent jobs on a shared first node (20000-39999)."""
    return PORT_BASE + job_id % PORT_SPAN


def rendezvous_from_env(env: Optional[Mapping[str, str]] = None) -> dict:
    """This node's place in the job: ``{nnodes, node_rank, master_addr, master_port}``.

    master_addr is the first host of ``SLURM_JOB_NODELIST`` (node rank 0 runs the rendezvous store
    there), master_port is ``20000 + SLURM_JOB_ID % 20000``, node_rank is ``SLURM_NODEID``.
    Needs an ``srun`` task (one per node), not the batch shell: the batch shell has no SLURM_NODEID.
    """
    env = os.environ if env is None else env

    def get(*names: str) -> str:
        for n in names:
            if env.get(n, "").strip():
                return env[n].strip()
        raise SlurmError(
            f"{names[0]} is not set: --from-slurm must run inside a Slurm job step (srun); "
            f"missing {' / '.join(names)}"
        )

    def as_int(name: str, value: str) -> int:
        try:
            return int(value)
        except ValueError:
            raise SlurmError(f"{name}={value!r} is not an integer") from None

    job_id = as_int("SLURM_JOB_ID", get("SLURM_JOB_ID", "SLURM_JOBID"))
    nnodes = as_int("SLURM_NNODES", get("SLURM_NNODES", "SLURM_JOB_NUM_NODES"))
    node_rank = as_int("SLURM_NODEID", get("SLURM_NODEID"))
    nodelist = get("SLURM_JOB_NODELIST", "SLURM_NODELIST")
    if not 0 <= node_rank < nnodes:
        raise SlurmError(f"SLURM_NODEID={node_rank} is outside the job's {nnodes} nodes")
    hosts = hostnames(nodelist)
    if len(hosts) != nnodes:
        raise SlurmError(f"SLURM_JOB_NODELIST={nodelist!r} has {len(hosts)} hosts but SLURM_NNODES={nnodes}")
    return {
        "nnodes": nnodes,
        "node_rank": node_rank,
        "master_addr": hosts[0],
        "master_port": master_port(job_id),
    }


def torchrun_args(rdzv: Mapping[str, Any], nproc_per_node: int) -> list[str]:
    """torch.distributed.run arguments for one node of a static multi-node rendezvous."""
    return [
        f"--nnodes={rdzv['nnodes']}",
        f"--node_rank={rdzv['node_rank']}",
        f"--nproc_per_node={nproc_per_node}",
        f"--master_addr={rdzv['master_addr']}",
        f"--master_port={rdzv['master_port']}",
    ]


def job_fields(job_id: str) -> dict[str, str]:
    """``scontrol show job -o`` as a dict (ExitCode, Restarts, JobState, ...)."""
    proc = _run_slurm_tool(["scontrol", "show", "job", "-o", str(job_id)], "querying a job")
    if proc.returncode != 0:
        raise SlurmError(f"scontrol show job {job_id}: {proc.stderr.strip()}")
    return dict(kv.split("=", 1) for kv in proc.stdout.split() if "=" in kv)


__all__ = [
    "SlurmError",
    "SubmittedJob",
    "render_sbatch",
    "submit",
    "write_script",
    "write_and_submit",
    "rendezvous_from_env",
    "torchrun_args",
    "expand_hostlist",
    "hostnames",
    "master_port",
    "time_limit_seconds",
    "job_fields",
    "PREEMPT_FILE",
    "DONE_FILE",
]
