"""``launch`` (run a training job locally, across nodes, or on Slurm) and ``scaleforge`` (tools).

Everything that can be checked is checked here, in the launching process, before any worker starts:
the config (keys, types, choices), the mesh and batch arithmetic, the resume path.
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
    ap.add_argument("--nnodes", type=int, default=1, help="nodes of a hand-launched multi-node job")
    ap.add_argument("--node-rank", type=int, default=0, help="this node's rank in a multi-node job")
    ap.add_argument("--master", help="HOST:PORT of node 0 for a multi-node job")
    ap.add_argument("--slurm", action="store_true", help="render an sbatch script and submit it")
    ap.add_argument("--nodes", type=int, help="Slurm nodes (cluster.nodes)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (and sbatch script) only")
    ap.add_argument("--print-config", action="store_true", help="print the resolved YAML and exit")
    ap.add_argument("--resume", help="auto (default), none, or a checkpoint / run directory")
    ap.add_argument("--from-slurm", action="store_true", help=argparse.SUPPRESS)  # inside an sbatch job
    return ap


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
    else:
        nnodes = args.nnodes
    if cfg.cluster.procs_per_node < 1:
        _fail(f"cluster.procs_per_node: must be >= 1, got {cfg.cluster.procs_per_node}")
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


def _check_resume(cfg, run_dir: Path) -> None:
    from scaleforge.platform.checkpoint import resolve_resume

    resolve_resume(cfg.checkpoint.resume, run_dir)  # raises CheckpointError with the reason


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
    args = launch_parser().parse_args(argv)
    try:
        cfg, layout, nnodes = resolve_job(args)
        from scaleforge.platform.config import to_yaml
        from scaleforge.platform.trainer import run_dir_of

        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        run_dir = run_dir_of(cfg)
        if args.slurm or cfg.cluster.kind == "slurm" and not args.from_slurm:
            return _launch_slurm(cfg, layout, run_dir, args.dry_run)
        if args.dry_run:
            _print_plan(cfg, layout)
            return 0
        _check_resume(cfg, run_dir)
        if cfg.data.kind == "webdataset":  # missing shards etc. fail here, before any process starts
            from scaleforge.platform.data.loader import check_sources

            check_sources(cfg.data, layout.dp_size)
        if args.from_slurm:
            from scaleforge.launch.slurm import rendezvous_from_env

            rdzv = rendezvous_from_env()
            return _run_elastic(cfg, run_dir, rdzv["nnodes"], rdzv["node_rank"],
                                f"{rdzv['master_addr']}:{rdzv['master_port']}")
        if nnodes > 1 and not args.master:
            _fail("--nnodes > 1 needs --master HOST:PORT (the address of node 0)")
        if layout.tp > 1:
            import torch

            if not torch.cuda.is_available():
                _fail(f"parallel.tp={layout.tp}: megatron-core tensor parallelism needs CUDA GPUs, and this "
                      f"machine has none; use parallel.tp=1 (or launch on GPU nodes)")
            import importlib.util

            if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
                _fail(f"parallel.tp={layout.tp} needs megatron-core (pip install 'scaleforge[gpu]'; python >= 3.12)")
        return _run_elastic(cfg, run_dir, nnodes, args.node_rank, args.master)
    except _known_errors() as e:
        _fail(str(e))


def _launch_slurm(cfg, layout, run_dir: Path, dry_run: bool) -> int:
    from scaleforge.launch import slurm

    if dry_run:
        script = slurm.render_sbatch(cfg, run_dir, run_dir / "config.yaml")
        print(script)
        _print_plan(cfg, layout)
        return 0
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


def _run_elastic(cfg, run_dir: Path, nnodes: int, node_rank: int, master: str | None) -> int:
    """Start the workers through torch.distributed's elastic agent (what torchrun runs)."""
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
    lc = LaunchConfig(min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=cfg.cluster.procs_per_node,
                      run_id=run_id, rdzv_backend=backend, rdzv_endpoint=endpoint, rdzv_configs=rdzv_configs,
                      max_restarts=0, monitor_interval=0.2, start_method="spawn")
    if backend == "static":
        host, port = master.rsplit(":", 1)
        lc.master_addr, lc.master_port = host, int(port)
    cmd = [sys.executable, "-u", "-m", "scaleforge.launch.worker", "--config", str(config_path)]
    try:
        elastic_launch(lc, cmd[0])(*cmd[1:])
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        print(f"\nerror: worker rank {rank} failed (exit code {failure.exitcode}); its error first:",
              file=sys.stderr)
        msg = failure.message
        if isinstance(msg, dict):
            msg = msg.get("message", msg)
        print(msg if msg else "(no traceback recorded: the process was killed or crashed)", file=sys.stderr)
        return 1
    return 0


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
    except _known_errors() + (FileNotFoundError,) as e:
        _fail(str(e))
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


if __name__ == "__main__":
    # `python -m scaleforge.launch.cli` is what Slurm jobs run (one task per node)
    sys.exit(launch_main())
