"""Child process for tests/e2e/test_zero.py: one stage-2 or SFT run under DeepSpeed ZeRO.

Run as a script, never imported by pytest's process (DeepSpeed and
``torch.distributed`` set up process-global state)::

    python _zero_worker.py stage2 --config FILE [--set KEY=VALUE ...] [--resume] --result OUT.json
    python _zero_worker.py sft    --config FILE [--set KEY=VALUE ...] [--resume] --result OUT.json

It runs the job as ``vidalign train`` does (``load_config`` + ``run_stage2`` /
``run_sft``) and writes to ``OUT.json`` the per-step losses and what the ZeRO
engine held: its optimizer's class, its ZeRO stage, its gradient clipping and,
after each step, each param group of its optimizer (name, learning rate,
weight decay). Under ``torchrun`` each rank writes ``OUT-rank<R>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("job", choices=["stage2", "sft"])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--result", required=True)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    from vidalign.config import load_config
    from vidalign.log import configure_logging

    configure_logging()
    from vidalign_trainer import loop
    from vidalign_trainer.zero import ZeroEngine

    engines: list[ZeroEngine] = []
    groups_per_step: list[list[dict]] = []

    def capture(module):
        original = module.initialize

        def initialize(*a, **kw):
            zero = original(*a, **kw)
            engines.append(zero)
            return zero

        module.initialize = initialize

    step = ZeroEngine.step

    def recording_step(self):
        norm = step(self)
        groups_per_step.append(
            [
                {"name": g.get("name"), "lr": g["lr"], "weight_decay": g["weight_decay"]}
                for g in self.engine.optimizer.param_groups
            ]
        )
        return norm

    ZeroEngine.step = recording_step
    capture(loop)  # the skeleton builds every job's engine

    if args.job == "stage2":
        from vidalign_trainer import stage2

        config = load_config(stage2.Stage2Config, args.config, args.set)
        losses = stage2.run_stage2(config, resume=args.resume)
    else:
        from vidalign_trainer import sft

        config = load_config(sft.SFTConfig, args.config, args.set)
        losses = [step["loss"] for step in sft.run_sft(config, resume=args.resume).losses]
    (zero,) = engines
    result = {
        "losses": losses,
        "rank": zero.ranks.rank,
        "world_size": zero.ranks.world_size,
        "optimizer": type(zero.optimizer).__name__,
        "zero_stage": zero.engine.zero_optimization_stage(),
        "gradient_clipping": zero.engine.gradient_clipping(),
        "param_groups": groups_per_step,
    }
    out = Path(args.result)
    if zero.ranks.world_size > 1:
        out = out.with_name(f"{out.stem}-rank{zero.ranks.rank}{out.suffix}")
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
