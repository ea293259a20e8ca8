"""What a multi-process launch (``torchrun``, ``accelerate launch``) changes, and which modes a method refuses.

Every rank runs the whole pipeline. Training stages are data-parallel over all ranks; evaluation splits its
prompts over the ranks and gathers the answers in order; what writes (stage outputs, results) or must run once
(judges, post-stage repairs) runs on rank 0 while the others wait for it and then read what it wrote.

Training modes, as :func:`trainer_mode` (from the Trainer's accelerator) and :func:`launch_mode` (from the
launcher's environment, before any Trainer exists) name them: ``single``, ``ddp``, ``fsdp``,
``deepspeed_zero0`` … ``deepspeed_zero3``. A method lists the ones it cannot run under in
``Method.unsupported_modes``; :func:`check_supported` refuses them with the method's reason.
"""

from __future__ import annotations

import datetime
import gc
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from ftguard.errors import FtguardError

DEEPSPEED = tuple(f"deepspeed_zero{stage}" for stage in range(4))
MODES = ("single", "ddp", "fsdp", *DEEPSPEED)
SHARDED = ("fsdp", "deepspeed_zero3")  # the modes in which no rank holds the whole weights between passes
# TrainingArguments' ddp_timeout default: how long a rank waits for rank 0's single-rank work (judging, saving).
TIMEOUT_S = 1800


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Join the launch's process group now (a no-op in a single process or once joined).

    The pipeline needs collectives before any Trainer exists (evaluating the base model). accelerate's
    ``PartialState`` is what the Trainer's arguments would create later (NCCL on GPUs, gloo on CPUs, the local
    GPU made current), and being a shared singleton, the Trainer then reuses it.
    """
    if world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available(), timeout=datetime.timedelta(seconds=TIMEOUT_S))
    if not is_main():
        # One rank reports progress; the others would repeat it line for line.
        logging.getLogger("ftguard").setLevel(logging.WARNING)


def shutdown() -> None:
    """Leave the process group together, once every rank has finished its work (a no-op in one process).

    A rank that exits while another still uses the group can abort in gloo's teardown ("terminate called without
    an active exception", exit code -6, seen in a 2-process CPU run): a barrier, then destroying the group, ends
    every rank cleanly. The collection first frees the trainers and DDP wrappers that reference cycles keep alive,
    so that the group's last users go while it still exists, not in the interpreter's teardown.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (``value`` itself in a single process)."""
    if world_size() <= 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if world_size() <= 1:
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


# ---------------------------------------------------------------------------------------------- modes


def trainer_mode(accelerator: Any) -> str:
    """The training mode of a Trainer's accelerator (the authority once a Trainer exists)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return f"deepspeed_zero{int(accelerator.state.deepspeed_plugin.zero_stage or 0)}"
    if kind == DistributedType.FSDP:
        return "fsdp"
    return "ddp" if accelerator.num_processes > 1 else "single"


def launch_mode(env: Mapping[str, str] | None = None) -> str:
    """The training mode the launcher asked for, from the variables ``accelerate launch`` and ``torchrun`` set."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if stage is None and env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
            with open(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"], encoding="utf-8") as fh:
                stage = json.load(fh).get("zero_optimization", {}).get("stage", 0)
        return f"deepspeed_zero{int(stage or 0)}"
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return "ddp" if int(env.get("WORLD_SIZE", "1")) > 1 else "single"


def check_supported(method: Any, stage: str, mode: str) -> None:
    """Refuse ``mode`` if the method lists it in ``unsupported_modes``, naming what it can run under instead."""
    reason = getattr(method, "unsupported_modes", {}).get(mode)
    if reason is None:
        return
    fine = [m for m in MODES if m not in method.unsupported_modes and m != "deepspeed_zero0"]
    raise FtguardError(
        f"{stage}.method '{method.name}' cannot train under {mode}: {reason}. It runs under: {', '.join(fine)} "
        "(multi-GPU data parallel: accelerate launch --config_file accelerate/ddp.yaml, or torchrun)"
    )
