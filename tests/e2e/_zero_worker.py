"""Child process for tests/e2e/test_zero*.py: one stage-2, SFT or stage-3 run under DeepSpeed ZeRO.

Run as a script, never imported by pytest's process (DeepSpeed and
``torch.distributed`` set up process-global state)::

    python _zero_worker.py stage2 --config FILE [--set KEY=VALUE ...] [--resume] --result OUT.json
    python _zero_worker.py sft    --config FILE [--set KEY=VALUE ...] [--resume] --result OUT.json
    python _zero_worker.py stage3 --config FILE [--set KEY=VALUE ...] [--resume] --result OUT.json

It runs the job as ``vidalign train`` does (``load_config`` + ``run_stage2`` /
``run_sft``) and writes to ``OUT.json`` the per-step losses and what the ZeRO
engine held: its optimizer's class, its ZeRO stage, its gradient clipping and,
after each step, each param group of its optimizer (name, learning rate,
weight decay), and at the first step how many parameter elements the module has
and how many this rank holds (ZeRO-3: its slices). SFT and stage 3 also write ``OUT-module.safetensors``: the
trainable weights of the job's module after the run (what ``fit`` left in it,
``{file stem}/{name}`` as the checkpoints name them). Under ``torchrun`` each
rank writes ``OUT-rank<R>.json`` (and ``OUT-rank<R>-module.safetensors``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("job", choices=["stage2", "sft", "stage3"])
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
    elements: dict[str, int] = {}

    def capture(module):
        original = module.initialize

        def initialize(*a, **kw):
            zero = original(*a, **kw)
            engines.append(zero)
            return zero

        module.initialize = initialize

    step = ZeroEngine.step

    def recording_step(self):
        if not elements:
            params = list(self.module.parameters())
            elements["whole"] = sum(getattr(p, "ds_numel", p.numel()) for p in params)
            elements["held"] = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                                   for p in params)
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

    module: dict[str, torch.Tensor] = {}
    if args.job == "stage2":
        from vidalign_trainer import stage2

        config = load_config(stage2.Stage2Config, args.config, args.set)
        losses = stage2.run_stage2(config, resume=args.resume)
    elif args.job == "sft":
        from vidalign_trainer import sft

        config = load_config(sft.SFTConfig, args.config, args.set)
        run = sft.run_sft(config, resume=args.resume)
        losses = [step["loss"] for step in run.losses]
        module = {
            **{f"model/{k}": v for k, v in sft.trainable_state(run.videollm.model).items()},
            **{f"aligner/{k}": v for k, v in run.aligner.state_dict().items()},
        }
    else:
        from vidalign_trainer import stage3

        config = load_config(stage3.Stage3Config, args.config, args.set)
        run = stage3.run_stage3(config, resume=args.resume)
        losses = run.losses
        module = {f"lora/{k}": v for k, v in stage3.trainable_state(run.videollm.model).items()}
    (zero,) = engines
    result = {
        "losses": losses,
        "rank": zero.ranks.rank,
        "world_size": zero.ranks.world_size,
        "optimizer": type(zero.optimizer).__name__,
        "zero_stage": zero.engine.zero_optimization_stage(),
        "gradient_clipping": zero.engine.gradient_clipping(),
        "param_groups": groups_per_step,
        "elements": elements,
    }
    out = Path(args.result)
    if zero.ranks.world_size > 1:
        out = out.with_name(f"{out.stem}-rank{zero.ranks.rank}{out.suffix}")
    out.write_text(json.dumps(result))
    if module:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu().clone() for k, v in module.items()},
                  out.with_name(f"{out.stem}-module.safetensors"))


if __name__ == "__main__":
    main()
