"""``launch`` (run a training job locally, across nodes, or on Slurm) and ``scaleforge`` (tools).

Everything that can be checked is checked here, in the launching process, before any worker starts and before
anything in the run directory is written (``preflight.py``): the flags, the config (keys, types, choices, the
recipe's model, the optimizer's arguments), the mesh and batch arithmetic, the shards, the resume checkpoint
and whether it fits the config. Local, multi-node, Slurm and ``--dry-run`` launches run the same checks.
"""
from __future__ import annotations

import argparse
import os
import sys
import uuid
from pathlib import Path
from typing import NoReturn

EXIT_USAGE = 2


def _fail(msg: str) -> NoReturn:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def _known_errors():
    from scaleforge.launch.slurm import SlurmError
    from scaleforge.platform.checkpoint import CheckpointError
    from scaleforge.platform.config import ConfigError
    from scaleforge.platform.data import DataError

    return (ConfigError, CheckpointError, SlurmError, DataError)


# ---------------------------------------------------------------------------------------------------
# launch
# ---------------------------------------------------------------------------------------------------
def launch_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="launch", description="Run a ScaleForge training job.",
        epilog="Overrides are omegaconf dotlist entries, e.g. trainer.max_steps=20 run.name=foo")
    ap.add_argument("--config", required=True, help="YAML file (looked up in ./ then configs/)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides")
    ap.add_argument("--nproc", type=int, help="worker processes per node (cluster.procs_per_node)")
    ap.add_argument("--nnodes", type=int, help="nodes of a hand-launched multi-node job (default 1)")
    ap.add_argument("--node-rank", type=int, help="this node's rank in a multi-node job (default 0)")
    ap.add_argument("--master", help="HOST:PORT of node 0 for a multi-node job")
    ap.add_argument("--slurm", action="store_true", help="render an sbatch script and submit it")
    ap.add_argument("--nodes", type=int, help="Slurm nodes (cluster.nodes)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (and sbatch script) only")
    ap.add_argument("--print-config", action="store_true", help="print the resolved YAML and exit")
    ap.add_argument("--resume", help="auto (default), none, or a checkpoint / run directory")
    ap.add_argument("--from-slurm", action="store_true", help=argparse.SUPPRESS)  # inside an sbatch job
    return ap


def check_flags(args) -> None:
    """Flag combinations that would otherwise be dropped without a word, hang or end in a traceback."""
    if args.slurm or args.from_slurm:
        if args.nnodes is not None or args.node_rank is not None or args.master:
            _fail("--nnodes / --node-rank / --master are for a hand-launched multi-node job; "
                  "with --slurm use --nodes N")
        return
    if args.nodes is not None:
        _fail("--nodes N is for Slurm (--slurm); a hand-launched multi-node job takes "
              "--nnodes N --node-rank R --master HOST:PORT on every node")
    nnodes = 1 if args.nnodes is None else args.nnodes
    rank = 0 if args.node_rank is None else args.node_rank
    if nnodes < 1:
        _fail(f"--nnodes {nnodes}: must be >= 1")
    if not 0 <= rank < nnodes:
        _fail(f"--node-rank {rank}: must be in [0, --nnodes {nnodes})")
    if nnodes > 1 and not args.master:
        _fail("--nnodes > 1 needs --master HOST:PORT (the address of node 0)")
    if args.master:
        if nnodes == 1:
            _fail("--master is for a multi-node job (--nnodes > 1)")
        host, _, port = args.master.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            _fail(f"--master {args.master}: expected HOST:PORT, e.g. {args.master.split(':')[0] or 'node0'}:29500")


def resolve_job(args):
    """Load + validate the config and apply the command-line flags. Returns (cfg, layout, nnodes)."""
    from omegaconf import OmegaConf

    from scaleforge.models import recipe_config_class
    from scaleforge.platform.config import derive_layout, load_config, validate

    cfg = load_config(args.config, args.overrides, recipe_config=recipe_config_class)
    raw = OmegaConf.structured(cfg)
    if args.nproc is not None:
        raw.cluster.procs_per_node = args.nproc
    if args.nodes is not None:
        raw.cluster.nodes = args.nodes
    if args.slurm:
        raw.cluster.kind = "slurm"
    if args.resume is not None:
        raw.checkpoint.resume = args.resume
    cfg = validate(raw, recipe_config_class)
    if cfg.cluster.kind == "slurm" or args.from_slurm:
        nnodes = cfg.cluster.nodes
        if nnodes < 1:
            _fail(f"cluster.nodes: must be >= 1, got {nnodes}")
    else:
        nnodes = args.nnodes or 1
    if cfg.cluster.procs_per_node < 1:
        _fail(f"cluster.procs_per_node: must be >= 1, got {cfg.cluster.procs_per_node}")
    if cfg.parallel.engine == "deepspeed":
        from scaleforge.platform.config import ConfigError
        from scaleforge.platform.deepspeed_engine import unsupported

        why = unsupported(cfg)
        if why:
            raise ConfigError(f"parallel.engine=deepspeed: {why[0]}")
    layout = derive_layout(cfg, nnodes * cfg.cluster.procs_per_node)
    if layout.tp > 1:
        _check_tensor_parallel(cfg, layout)
    return cfg, layout, nnodes


def _check_tensor_parallel(cfg, layout) -> None:
    """Heads, KV heads, features, vocabulary and sequence divisible by parallel.tp: checked on the meta
    model before any worker starts."""
    import torch

    from scaleforge.models import get_recipe_class
    from scaleforge.platform.tensor_parallel import check_tensor_parallel

    recipe = get_recipe_class(cfg.model.recipe)(cfg.model, cfg)
    with torch.device("meta"):
        model = recipe.build_model(torch.device("meta"))
    check_tensor_parallel(model, recipe.tensor_parallel_plan(model), layout.tp, recipe.name)


def _check_tensor_parallel_runtime(layout) -> None:
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return  # CPU workers: the torch.distributed layers (tensor_parallel_torch), no megatron-core
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        _fail(f"parallel.tp={layout.tp} needs megatron-core (pip install 'scaleforge[gpu]'; python >= 3.12)")


def _write_config(cfg, run_dir: Path) -> Path:
    from scaleforge.platform.config import to_yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    tmp = run_dir / f".config.yaml.{uuid.uuid4().hex[:8]}"
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, path)
    return path


def _print_plan(cfg, layout) -> None:
    from scaleforge.models import get_recipe_class
    from scaleforge.platform.plan import make_plan

    recipe = get_recipe_class(cfg.model.recipe)(cfg.model, cfg)
    plan = make_plan(cfg, layout, recipe)
    print("plan:")
    for line in plan.lines():
        print("  " + line)


def launch_main(argv: list[str] | None = None) -> int:
    args = launch_parser().parse_intermixed_args(argv)  # overrides may come before or after the flags
    check_flags(args)
    try:
        cfg, layout, nnodes = resolve_job(args)
        from scaleforge.launch import preflight
        from scaleforge.platform.config import to_yaml
        from scaleforge.platform.trainer import RESUME_ENV, run_dir_of

        preflight.check_job(cfg)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        run_dir = run_dir_of(cfg)
        if args.dry_run:  # the plan, then what this machine would refuse (shards, resume checkpoint)
            if cfg.cluster.kind == "slurm" and not args.from_slurm:
                from scaleforge.launch import slurm

                print(slurm.render_sbatch(cfg, run_dir, run_dir / "config.yaml"))
            _print_plan(cfg, layout)
        # everything else that can be wrong, for every kind of launch, before anything is written
        resume_from = preflight.check_resume(cfg, run_dir, layout.world_size)
        # this launch's workers take the checkpoint resolved and verified here, without verifying again
        os.environ[RESUME_ENV] = str(resume_from) if resume_from is not None else "none"
        preflight.check_sources(cfg, layout)
        if resume_from is not None:
            step = preflight.saved_step(resume_from)
            print(f"resuming from {resume_from} (step {step})")
            note = preflight.schedule_change(cfg, resume_from, step)
            if note:
                print(note)
            if step >= cfg.trainer.max_steps and not args.from_slurm:
                print(f"nothing to do: the checkpoint is at step {step} and trainer.max_steps is "
                      f"{cfg.trainer.max_steps}; raise trainer.max_steps to train further")
                return 0
        if args.dry_run:
            return 0
        if layout.tp > 1 and not (cfg.cluster.kind == "slurm" and not args.from_slurm):
            _check_tensor_parallel_runtime(layout)
        node_rank = 0 if args.node_rank is None else args.node_rank
        if cfg.checkpoint.resume == "none" and node_rank == 0 and not args.from_slurm:
            moved = preflight.start_fresh(run_dir)
            if moved is not None:
                print(f"--resume none: moved the previous run in {run_dir} aside to {moved}")
            if cfg.cluster.kind == "slurm":  # requeued jobs must resume this new run, not restart it
                cfg.checkpoint.resume = "auto"
        if cfg.cluster.kind == "slurm" and not args.from_slurm:
            return _launch_slurm(cfg, run_dir)
        if args.from_slurm:
            from scaleforge.launch.slurm import rendezvous_from_env

            rdzv = rendezvous_from_env()
            return _run_elastic(cfg, run_dir, rdzv["nnodes"], rdzv["node_rank"],
                                f"{rdzv['master_addr']}:{rdzv['master_port']}")
        return _run_elastic(cfg, run_dir, nnodes, node_rank, args.master)
    except _known_errors() as e:
        _fail(str(e))


def _launch_slurm(cfg, run_dir: Path) -> int:
    from scaleforge.launch import slurm

    config_path = _write_config(cfg, run_dir)
    script = slurm.render_sbatch(cfg, run_dir, config_path)
    script_path = run_dir / "job.sbatch"
    script_path.write_text(script)
    job_id = slurm.submit(script_path)
    print(f"submitted Slurm job {job_id}")
    print(f"  script: {script_path}")
    print(f"  log:    {run_dir / f'slurm-{job_id}.out'}")
    print(f"  run:    {run_dir}")
    return 0


class _Interrupts:
    """Ctrl-C is a polite stop, as SIGTERM is: the launcher sends SIGTERM to the workers (each finishes its step,
    a checkpoint is written, they exit); a second Ctrl-C kills them at once. The workers ignore SIGINT
    themselves (the terminal sends it to the whole process group), so only this path reaches them."""

    def __init__(self):
        self.signal: str | None = None
        self.count = 0

    def install(self) -> None:
        import signal

        signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        import signal

        self.count += 1
        if self.count == 1:
            self.signal = "SIGINT"
            print("\ninterrupted: the workers finish their step and write a checkpoint "
                  "(Ctrl-C again to abort at once)", file=sys.stderr, flush=True)
            signal.raise_signal(signal.SIGTERM)  # the agent's shutdown path: SIGTERM to every worker
            return
        print("aborted: workers killed without a checkpoint", file=sys.stderr, flush=True)
        for pid in _descendants(os.getpid()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os._exit(130)


def _descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (Linux /proc), children first."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        out += kids
        frontier = kids
    return out


def _supported(config_cls, options: dict) -> dict:
    """The options ``config_cls`` (a dataclass) has: torch added the agent's ``shutdown_timeout`` and
    ``signals_to_handle`` after 2.11, the CUDA build clusters run; there the agent keeps its own defaults."""
    fields = getattr(config_cls, "__dataclass_fields__", {})
    return {k: v for k, v in options.items() if k in fields}


def _run_elastic(cfg, run_dir: Path, nnodes: int, node_rank: int, master: str | None) -> int:
    """Start the workers through torch.distributed's elastic agent (what torchrun runs)."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from scaleforge.platform.dist import _free_port

    if node_rank == 0:
        config_path = _write_config(cfg, run_dir)
    else:
        config_path = run_dir / "config.yaml"
        if not config_path.exists():  # no shared filesystem: write our own copy
            config_path = _write_config(cfg, run_dir)
    if nnodes == 1:
        # c10d rendezvous on a free local port (what `torchrun --standalone` does)
        backend, endpoint, rdzv_configs = "c10d", f"127.0.0.1:{_free_port()}", {}
        run_id = uuid.uuid4().hex[:12]
    else:
        # static rendezvous: node ranks are the ones given (--node-rank or SLURM_NODEID), node 0 hosts the store
        backend, endpoint, rdzv_configs = "static", master, {"rank": node_rank}
        run_id = "scaleforge"
    env_threads = os.environ.get("OMP_NUM_THREADS")
    if env_threads is None:
        # torchrun would set 1; a small CPU job wants the cores split between its workers instead
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cfg.cluster.procs_per_node))
    # a stopped worker gets as long to write its checkpoint as a preempted Slurm job has
    shutdown = dict(shutdown_timeout=max(30, cfg.cluster.preempt_grace_s),
                    # the agent turns these into a shutdown that forwards the signal to the workers; SIGINT
                    # stays with _Interrupts, which forwards SIGTERM instead
                    signals_to_handle="SIGTERM,SIGHUP,SIGQUIT")
    lc = LaunchConfig(min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=cfg.cluster.procs_per_node,
                      run_id=run_id, rdzv_backend=backend, rdzv_endpoint=endpoint, rdzv_configs=rdzv_configs,
                      max_restarts=0, monitor_interval=0.2, start_method="spawn", **_supported(LaunchConfig, shutdown))
    if backend == "static":
        host, port = master.rsplit(":", 1)
        lc.master_addr, lc.master_port = host, int(port)
    cmd = [sys.executable, "-u", "-m", "scaleforge.launch.worker", "--config", str(config_path)]
    interrupts = _Interrupts()
    interrupts.install()
    try:
        elastic_launch(lc, cmd[0])(*cmd[1:])
    except SignalException as e:
        return _stopped_by_signal(interrupts.signal or e.sigval.name, run_dir)
    except ChildFailedError as e:
        _report_failure(e)
        return 1
    return 0


def _stopped_by_signal(name: str, run_dir: Path) -> int:
    from scaleforge.platform.checkpoint import find_latest

    latest = find_latest(run_dir / "checkpoints")
    where = f"last checkpoint {latest}" if latest else "no checkpoint was written"
    print(f"stopped by {name}: {where}; run the same command to resume", file=sys.stderr)
    return 130 if name == "SIGINT" else 0


def _report_failure(e) -> None:
    """The first failing rank's one-line cause first, then its traceback (every rank's own output came before)."""
    rank, failure = e.get_first_failure()
    msg, stack = failure.message, ""
    if isinstance(msg, dict):  # what @record wrote: {"message": "Type: text", "extraInfo": {"py_callstack": ...}}
        stack = str(msg.get("extraInfo", {}).get("py_callstack", "")).strip()
        msg = msg.get("message", "")
    if failure.exitcode < 0:
        cause = f"killed by {failure.signal_name()}"
    elif msg and not str(msg).startswith("To enable traceback"):
        cause = str(msg).strip().splitlines()[0]
    else:
        cause = "no error recorded (the process exited without a Python exception; see its output above)"
    others = sorted(r for r in e.failures if r != rank)
    also = f" (ranks {', '.join(map(str, others))} failed after it)" if others else ""
    print(f"\nerror: worker rank {rank} failed first (exit code {failure.exitcode}): {cause}{also}", file=sys.stderr)
    if stack:
        print(f"rank {rank}'s traceback:\n{stack}", file=sys.stderr)
        print(f"error: worker rank {rank}: {cause}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------
# scaleforge (tools)
# ---------------------------------------------------------------------------------------------------
def scaleforge_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="scaleforge", description="ScaleForge tools")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plot", help="draw RUN_DIR/metrics.png from metrics.jsonl")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("export", help="export a run's latest checkpoint to a serving format")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--format", required=True, help="hf | diffusers (depends on the recipe)")
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", help="a checkpoint folder (default: the run's latest)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("ds-universal", help="add DeepSpeed's universal form to a DeepSpeed checkpoint, so that a "
                                            "run of another world size can resume it")
    p.add_argument("checkpoint", help="a run directory (its latest checkpoint) or a step_NNNNNNNN folder")
    p.set_defaults(func=_cmd_ds_universal)

    for module, fn in (("scaleforge.platform.data.cli", "add_data_subcommands"),
                       ("scaleforge.models.sana.cli", "add_sana_subcommands"),
                       ("scaleforge.models.nvila.cli", "add_nvila_subcommands")):
        try:
            mod = __import__(module, fromlist=[fn])
        except ModuleNotFoundError as e:  # a recipe not present in this install
            if e.name and module.startswith(e.name):
                continue
            raise
        getattr(mod, fn)(sub)
    return ap


def scaleforge_main(argv: list[str] | None = None) -> int:
    args = scaleforge_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except _known_errors() + (FileNotFoundError, FileExistsError) as e:
        _fail(str(e))
    except BrokenPipeError:  # `scaleforge data inspect ... | head`: the reader left, stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
        return 141  # 128 + SIGPIPE, what shells report for a writer cut off by a pipe
    return int(rc or 0)


def _cmd_plot(args) -> int:
    from scaleforge.platform.metrics import plot_run

    print(plot_run(args.run_dir))
    return 0


def _cmd_export(args) -> int:
    from scaleforge.launch.export import export_run

    out = export_run(Path(args.run), args.format, Path(args.out), checkpoint=args.checkpoint, ema=args.ema)
    print(f"exported {out}")
    return 0


def _cmd_ds_universal(args) -> int:
    from scaleforge.platform.checkpoint import resolve_resume
    from scaleforge.platform.deepspeed_engine import convert_to_universal

    ckpt = resolve_resume(args.checkpoint, Path(args.checkpoint))  # verified against COMPLETE first
    print(f"universal checkpoint: {convert_to_universal(ckpt)}")
    return 0


if __name__ == "__main__":
    # `python -m scaleforge.launch.cli` is what Slurm jobs run (one task per node)
    sys.exit(launch_main())
