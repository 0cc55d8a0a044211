"""What the launcher (torchrun, `accelerate launch`) says about this process, read from its environment
alone: the CLI asks before any command runs, so this module imports nothing heavy (parallel.py holds the
process group itself)."""
from __future__ import annotations

import os

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
