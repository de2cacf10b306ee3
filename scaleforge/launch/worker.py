"""The program each worker process runs (started by torch.distributed.run through ``launch``)."""
from __future__ import annotations

import argparse
import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import record


@record  # writes this rank's traceback where the elastic agent reads it, so `launch` can show it first
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scaleforge-worker")
    ap.add_argument("--config", required=True, help="resolved config.yaml written by launch")
    args = ap.parse_args(argv)
    # Ctrl-C reaches every process of the terminal's process group; the launcher turns it into SIGTERM for
    # the workers (checkpoint, then exit), so a worker's own SIGINT must not interrupt it mid-step
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    from scaleforge.models import get_recipe_class, recipe_config_class
    from scaleforge.platform.config import load_config
    from scaleforge.platform.trainer import train

    cfg = load_config(args.config, [], recipe_config=recipe_config_class)
    train(cfg, get_recipe_class(cfg.model.recipe))
    from scaleforge.platform import dist as sfdist

    sfdist.destroy()
    return 0


if __name__ == "__main__":
    code = main()  # an exception leaves through the normal path (@record writes it for launch)
    from scaleforge.platform.dist import exit_process

    exit_process(code)  # finished: skip interpreter finalization (see exit_process)
