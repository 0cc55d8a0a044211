"""What the launcher (torchrun, `accelerate launch`) says about this process, read from its environment
alone: the CLI asks before any command runs, so this module imports nothing heavy (parallel.py holds the
process group itself)."""
from __future__ import annotations

import os
import re

from immunizer.errors import ImmunizerError


def launched_world_size() -> int:
    """The processes of the launched job (torchrun / accelerate launch set WORLD_SIZE); 1 when not launched."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_distributed() -> bool:
    """True under torchrun / accelerate launch with more than one process."""
    return launched_world_size() > 1


def split_evenly(size: int, world_size: int, what: str, setting: str) -> int:
    """Each process's share of `size` items; refuses a size that does not split, naming `setting` to change."""
    if size % world_size:
        raise ImmunizerError(f"{what} {size} cannot be split evenly over {world_size} processes; pass {setting} "
                             f"with N a multiple of {world_size}, or launch fewer processes")
    return size // world_size


def launch_flag(name: str) -> bool:
    """A true/false setting accelerate's launcher passes in the environment (e.g. ACCELERATE_USE_FSDP)."""
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def launched_sharded() -> bool:
    """True under `accelerate launch --use_fsdp` (or a config with distributed_type FSDP) with several processes."""
    return launched_distributed() and launch_flag("ACCELERATE_USE_FSDP")


def main_process() -> bool:
    """True in a one-process run and in the first process of a launched job (before any process group exists)."""
    return int(os.environ.get("RANK", "0")) == 0


def pin_device(spec: str) -> None:
    """`immunizer --device SPEC`: where a one-process command trains, generates and evaluates. Pinned through
    the environment before torch starts, so that TRL's trainer (which takes the first visible GPU) runs there too:
    `cpu` hides every GPU, `cuda:N` makes the N-th visible GPU the only one, `cuda` is the first."""
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", spec.strip().lower())
    if not m or (m[1] == "cpu" and m[2] is not None):
        raise ImmunizerError(f"--device {spec!r} is not a device; use cpu, cuda or cuda:N")
    if launched_distributed():
        raise ImmunizerError("--device does not apply under `accelerate launch`, which gives each process its own GPU; "
                             "leave it out (or choose the GPUs with CUDA_VISIBLE_DEVICES / --gpu_ids)")
    if m[1] == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["IMMUNIZER_DEVICE"] = "cpu"
        return
    index = int(m[2] or 0)
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if "CUDA_VISIBLE_DEVICES" in os.environ and not visible:
        raise ImmunizerError(f"--device {spec}: CUDA_VISIBLE_DEVICES='' hides every GPU; unset it, or choose --device cpu")
    if "CUDA_VISIBLE_DEVICES" in os.environ and index >= len(visible):
        raise ImmunizerError(f"--device {spec}: CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r} shows "
                             f"{len(visible)} GPU(s); choose cuda:0 to cuda:{len(visible) - 1} or change it")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[index] if visible else str(index)
    os.environ["IMMUNIZER_DEVICE"] = "cuda"
