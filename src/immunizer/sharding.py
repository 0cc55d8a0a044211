"""FSDP full sharding for the training loop (issue 18), on PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`).

Launched with accelerate's FSDP settings (`accelerate launch --use_fsdp ...` or a config with distributed_type FSDP),
every trainable model is sharded the way accelerate's transformer auto-wrap does it: each decoder layer (the
classes a transformers model names in `_no_split_modules`) is one FSDP unit, the root another. A parameter is then
a `DTensor` whose local piece is a contiguous block of rows (dim 0, `torch.chunk`'s split), so in the flattened
parameter it is one contiguous range: the canary scores, the canaries and their drift are read from that range
where it lives (`LocalRange`), and the exact top-K% selection (canaries.py) consumes the ranges as it consumes a
data-parallel run's slices. FSDP's backward reduce-scatters and averages the gradients itself.

Written here: FSDP2 shards, gathers and steps; what it cannot do for us is index a sharded parameter by flat
position, which immunization's canaries need."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from immunizer.errors import ImmunizerError
from immunizer.launch import launch_flag


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor  # noqa: PLC0415  (torch.distributed.tensor loads lazily)

    return isinstance(t, DTensor)


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """This process's piece of `t` (the tensor itself when it is not sharded). Shares storage with `t`."""
    return t.to_local() if t is not None and is_sharded(t) else t


@dataclass(frozen=True)
class LocalRange:
    """Elements [start, end) of a parameter's flattened values live on this process."""

    start: int
    end: int

    @classmethod
    def rows_of(cls, rows: int, columns: int, world: int, rank: int) -> "LocalRange":
        """Process `rank`'s piece of a (rows, columns...) tensor split on dim 0 as torch.chunk splits it:
        ceil(rows / world) rows each, the last pieces shorter or empty."""
        per = -(-rows // world)
        first, last = min(rows, rank * per), min(rows, (rank + 1) * per)
        return cls(first * columns, last * columns)

    @classmethod
    def of(cls, p: torch.Tensor) -> "LocalRange":
        if not is_sharded(p):
            return cls(0, p.numel())
        (placement,) = p.placements
        if not (placement.is_shard() and placement.dim == 0):
            raise ValueError(f"expected a parameter sharded on dim 0, got placements {p.placements}")
        rows = p.shape[0]
        found = cls.rows_of(rows, p.numel() // max(rows, 1), p.device_mesh.size(), p.device_mesh.get_local_rank())
        if found.end - found.start != p.to_local().numel():
            raise ValueError(f"FSDP placed {p.to_local().numel()} elements here, not {found} of {tuple(p.shape)}")
        return found

    def holds(self, idx: torch.Tensor) -> torch.Tensor:
        """Which of `idx` (flat indices into the whole parameter) live here."""
        return (idx >= self.start) & (idx < self.end)


def layer_names(model: torch.nn.Module) -> list[str]:
    """The module class names FSDP wraps one by one: the launcher's `--fsdp_transformer_layer_cls_to_wrap` when
    given, else the model's `_no_split_modules` (its decoder layers), as accelerate's TRANSFORMER_BASED_WRAP
    policy reads them."""
    given = os.environ.get("FSDP_TRANSFORMER_LAYER_CLS_TO_WRAP", "")
    names = [n.strip() for n in given.split(",") if n.strip()] or list(getattr(model, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in model.modules()}
    return sorted(n for n in names if n in present)


def shard_model(model: torch.nn.Module, offload: bool = False) -> torch.nn.Module:
    """Shard `model` in place with FSDP2: every decoder layer, then the root. `offload` keeps the sharded
    parameters (and their optimizer state) in CPU memory between uses (accelerate's `fsdp_offload_params`)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard  # noqa: PLC0415

    policy = CPUOffloadPolicy() if offload else OffloadPolicy()
    names = layer_names(model)
    if not names:
        raise ImmunizerError(f"{type(model).__name__} names no decoder layers (`_no_split_modules`) to shard; pass "
                             "--fsdp_transformer_layer_cls_to_wrap to `accelerate launch`")
    # accelerate's --fsdp_reshard_after_forward: false keeps each layer's gathered weights until its backward
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "0", "no_reshard", "shard_grad_op")
    for module in list(model.modules()):
        if type(module).__name__ in names:
            fully_shard(module, offload_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, offload_policy=policy, reshard_after_forward=reshard)
    return model


def trainer_settings(model: torch.nn.Module) -> dict:
    """transformers `TrainingArguments` that make the Trainer shard `model` the way `shard_model` does (FSDP2,
    the same layers): the Trainer reads FSDP from its own arguments, not from the launcher's environment."""
    return {"fsdp": "full_shard", "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": layer_names(model),
                                                   "cpu_offload": launch_flag("FSDP_OFFLOAD_PARAMS")}}


def full_state(model: torch.nn.Module) -> dict | None:
    """The whole (unsharded) weights of `model`, in CPU memory on the main process only (None elsewhere); every
    process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: PLC0415

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return weights if dist.get_rank() == 0 else None


def _names(model, optimizer) -> list[str]:
    """The parameter names in the optimizer's order (what a one-process state dict numbers 0, 1, ...)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _by_name(moments: dict, names: list[str]) -> dict:
    """`Optimizer.state_dict()` numbers the parameters; torch.distributed.checkpoint names them."""
    return {"state": {names[i]: v for i, v in moments["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in moments["param_groups"]]}


def load_full_state(model: torch.nn.Module, weights: dict | None, optimizer=None, moments: dict | None = None) -> None:
    """Load whole state dicts (a checkpoint every process has read) into the sharded `model` (unless `weights` is
    None) and `optimizer` (with `moments`): the main process broadcasts, every process keeps its piece."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,  # noqa: PLC0415
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    main = dist.get_rank() == 0
    if weights is not None:
        set_model_state_dict(model, weights if main else {}, options=options)
    if optimizer is not None and moments is not None:
        set_optimizer_state_dict(model, optimizer, _by_name(moments, _names(model, optimizer)) if main else {},
                                 options=options)


def save_sharded(directory: Path, model: torch.nn.Module, optimizer=None) -> None:
    """Every process writes its own pieces of the weights and the optimizer's moments (when given) into
    `directory` (`torch.distributed.checkpoint`: no process ever holds the whole state). Every process must call it."""
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict  # noqa: PLC0415

    if optimizer is None:  # not get_state_dict: it would give a fresh optimizer moments by a zero step
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(directory))
        return
    weights, moments = get_state_dict(model, optimizer)
    dcp.save({"model": weights, "optimizer": moments}, checkpoint_id=str(directory))


def load_sharded(directory: Path, model: torch.nn.Module, optimizer=None, weights: bool = True) -> None:
    """Read what `save_sharded` wrote into `model` (unless `weights` is False) and `optimizer`, under any process
    count: torch.distributed.checkpoint reshards to this job's pieces, or assembles whole tensors in one process."""
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,  # noqa: PLC0415
                                                         set_model_state_dict, set_optimizer_state_dict)

    state = {}
    if weights:
        state["model"] = get_model_state_dict(model)
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)  # initialises the moments to load into
    one_process = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():  # it warns that one process reads it, even when told so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(directory), no_dist=one_process)
    if weights:
        set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
