"""``python -m trainer.evaluate CHECKPOINT [key=value ...]``: validation metrics of a checkpoint.

Runs under any launcher like the trainer itself (every sample counted once across ranks) and
prints one JSON line of metrics on rank 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainer import checkpoint, config, distributed, models
from trainer.__main__ import _one_line
from trainer.errors import EXIT_OK, EXIT_USER_ERROR, UserError
from trainer.logs import setup_console
from trainer.signals import StopRequest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("-c", "--config", action="append", default=[], metavar="FILE.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    topology = distributed.discover()
    setup_console(topology.rank)
    try:
        cfg = config.load(args.config, args.overrides)
        env = distributed.setup(cfg.dist.device, cfg.dist.backend, cfg.dist.timeout_s)
        from trainer.worker import Worker

        worker = Worker(cfg, env, cfg.run_dir, StopRequest())
        checkpoint.load_model_weights(models.unwrap(worker.net), checkpoint.load(args.checkpoint)["model"],
                                      args.checkpoint)
        metrics = worker.evaluate(worker.eval_model)
        if env.is_main:
            print(json.dumps(metrics), flush=True)
        del worker
        distributed.teardown(env)
        return EXIT_OK
    except UserError as exc:
        if topology.rank == 0:
            print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
