"""Where a candidate's weights come from: a live module, safetensors on disk (streamed one tensor
at a time), or a PEFT LoRA adapter read without merging. Every source yields the same thing, per
canary parameter (drift.Gathered): candidate − released at the canaries and at the reference sample,
and the non-finite weights it saw; drift.summarize folds that into the report, once per scan."""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from immunizer.breaker.drift import DriftReport, Gathered, summarize
from immunizer.breaker.reference import Reference
from immunizer.breaker.safetensors_reader import safetensors_index, safetensors_tensors
from immunizer.errors import ImmunizerError
from immunizer.sharding import LocalRange, is_sharded, local

_PEFT_PREFIX = "base_model.model."


# ---------------------------------------------------------------- shared by every source

def count_non_finite(*tensors: torch.Tensor) -> int:
    """NaN/inf entries over whole tensors: a poisoned weight anywhere counts, not only at the sampled ones.
    A sum carries any NaN/inf through and allocates nothing (isfinite over every tensor cost a quarter of a
    scan); only a non-finite sum (or an overflow) pays for the exact count."""
    return sum(0 if bool(torch.isfinite(t.sum())) else int((~torch.isfinite(t)).sum()) for t in tensors)


def tensor_deltas(reference: Reference, tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[Gathered]:
    """Deltas for full weight tensors given one at a time (a streamed file)."""
    for name, tensor in tensors:
        flat = tensor.detach().reshape(-1)
        non_finite = count_non_finite(flat)  # first: one sequential pass, so a mapped file is read in order
        yield (name,
               flat[reference.canary_index[name].to(flat.device)].float().cpu() - reference.canary_value[name],
               flat[reference.sample_index[name].to(flat.device)].float().cpu() - reference.sample_value[name],
               non_finite)


def check_coverage(reference: Reference, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Every canary parameter must be present with the released shape; name the problem otherwise."""
    missing = [n for n in reference.names if n not in shapes]
    if len(missing) == len(reference.names):
        example = next(iter(shapes), "nothing")
        raise ImmunizerError(
            f"{where} has none of the manifest's {len(missing)} canary parameters (it holds e.g. {example!r}, the "
            f"manifest expects e.g. {reference.names[0]!r}): wrong architecture, or not the model the manifest was "
            "written for")
    if missing:
        raise ImmunizerError(f"{where} is missing {len(missing)} canary parameters (e.g. {missing[0]!r}); "
                             "pass a complete checkpoint of the released model's architecture")
    wrong = [(n, shapes[n], reference.shapes.get(n)) for n in reference.names
             if reference.shapes.get(n) is not None and tuple(shapes[n]) != tuple(reference.shapes[n])]
    if wrong:
        n, got, want = wrong[0]
        raise ImmunizerError(f"{where}: {len(wrong)} parameters have another shape than in the released model "
                             f"(e.g. {n}: {tuple(got)} instead of {tuple(want)}); is this the same base model?")


# ---------------------------------------------------------------- safetensors on disk

def scan_safetensors(reference: Reference, path: Path) -> DriftReport:
    index = safetensors_index(path)
    check_coverage(reference, {n: shape for n, (_, shape) in index.items()}, str(path))
    return summarize(reference, tensor_deltas(reference, safetensors_tensors(path, set(reference.names))),
                     str(path), "safetensors", sorted({str(f) for f, _ in index.values()}))


# ---------------------------------------------------------------- LoRA: ΔW at the indices only

_CHUNK = 1 << 16


def lora_delta_at(a: torch.Tensor, b: torch.Tensor, scale: float, index: torch.Tensor, columns: int,
                  transposed: bool = False) -> torch.Tensor:
    """ΔW = scale · B·A read only at flat indices of W (shape out × `columns`): ΔW[i,j] = scale · B[i,:]·A[:,j].
    Costs O(len(index) · r), never materializes B·A. `transposed` is PEFT's fan_in_fan_out (W stored as in × out)."""
    rows, cols = index // columns, index % columns
    if transposed:
        rows, cols = cols, rows
    a_t, b = a.float().t().contiguous(), b.float()  # rows of Aᵀ: gathering them is contiguous, columns of A are not
    out = torch.empty(index.numel(), device=index.device)
    for start in range(0, index.numel(), _CHUNK):  # chunks keep the n x r temporaries in cache
        end = start + _CHUNK
        out[start:end] = (b[rows[start:end]] * a_t[cols[start:end]]).sum(-1)
    return scale * out


def _lora_scale(config: dict, module: str, rank: int) -> float:
    def pattern(table: dict, default):
        for key, value in (table or {}).items():
            if module == key or module.endswith("." + key) or re.fullmatch(key, module):
                return value
        return default

    alpha = pattern(config.get("alpha_pattern"), config.get("lora_alpha", rank))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ImmunizerError(f"{cfg_path} cannot be read as JSON ({exc})") from exc
    if config.get("peft_type") != "LORA":
        raise ImmunizerError(f"{adapter_dir} is a {config.get('peft_type')!r} adapter; the breaker reads LoRA adapters "
                             "without merging. Merge other adapter types into the model and scan the merged model")
    if config.get("use_dora"):
        raise ImmunizerError(f"{adapter_dir} is a DoRA adapter, whose update is not scale·B·A; merge it "
                             "(`merge_and_unload()`), save, and scan the merged model")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise ImmunizerError(f"{adapter_dir} has no adapter_model.safetensors; save the adapter with "
                             "`model.save_pretrained(dir)` (safetensors is PEFT's default)")
    stray = [p.name for p in adapter_dir.glob("*.safetensors") if p != weights]
    if stray:
        raise ImmunizerError(f"{adapter_dir} holds an adapter and other weight files ({', '.join(stray)}); a loader "
                             "takes one or the other, so no single verdict covers both. Put the adapter and the full "
                             "model in separate directories and scan each")
    return config, {name: tensor.clone() for name, tensor in safetensors_tensors(weights)}


def _strip(key: str) -> str:
    return key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key


def adapter_deltas(reference: Reference, config: dict, tensors: dict[str, torch.Tensor], where: str) -> Iterator[Gathered]:
    """candidate − released at the canaries and the sample, for the released model plus this adapter."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}  # modules_to_save: whole trained copies
    for key, tensor in tensors.items():
        bias = re.fullmatch(r"(.+)\.lora_B(?:\.[^.]+)?\.bias", key)
        if bias:  # lora_bias=True: the layer's output gains scale·b, i.e. its bias moves by scale·b
            pairs.setdefault(_strip(bias.group(1)), {})["lora_bias"] = tensor
            continue
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?(?:\.weight)?", key)
        if m:
            pairs.setdefault(_strip(m.group(1)), {})[m.group(2)] = tensor
        elif ".lora_" in key:
            raise ImmunizerError(f"{where}: unsupported LoRA tensor {key!r} (only lora_A/lora_B and embedding LoRA "
                                 "are read without merging); merge the adapter and scan the merged model")
        else:
            full[_strip(key).replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")] = tensor
    parameters, biases = {}, {}
    for module, ab in pairs.items():
        name = module + ".weight"
        if name not in reference.canary_index:
            raise ImmunizerError(f"{where}: the adapter targets {module!r}, which is not a parameter of the released "
                                 "model; was it trained on another architecture?")
        if "lora_bias" in ab:
            if module + ".bias" not in reference.canary_index:
                raise ImmunizerError(f"{where}: the adapter trains a LoRA bias on {module}, which has no bias in the "
                                     "released model: its effect lies outside every weight the breaker watches (and PEFT "
                                     "cannot merge it). Train the adapter without lora_bias")
            biases[module + ".bias"] = (module, ab.pop("lora_bias"))
        if len(ab) != 2:
            raise ImmunizerError(f"{where}: {module} has only {', '.join(ab) or 'a bias'}; the adapter file is incomplete")
        parameters[name] = (module, ab)
    for name in full:
        if name not in reference.canary_index:
            raise ImmunizerError(f"{where}: the adapter saves a full copy of {name!r}, which the released model lacks")
        if tuple(full[name].shape) != tuple(reference.shapes[name]):
            raise ImmunizerError(f"{where}: {name} has shape {tuple(full[name].shape)}, the released model "
                                 f"{tuple(reference.shapes[name])}")
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    for name in reference.names:
        ci, si = reference.canary_index[name], reference.sample_index[name]
        if name in full:
            flat = full[name].reshape(-1)
            yield (name, flat[ci].float() - reference.canary_value[name], flat[si].float() - reference.sample_value[name],
                   count_non_finite(flat))
        elif name in parameters:
            module, ab = parameters[name]
            shape = reference.shapes[name]
            if "lora_A" in ab:
                a, b = ab["lora_A"], ab["lora_B"]
                rank, columns, transposed = a.shape[0], shape[-1], fan_in_fan_out
            else:  # embedding LoRA: ΔE = (B·A)ᵀ, A is r × vocab, B is dim × r
                a, b = ab["lora_embedding_A"], ab["lora_embedding_B"]
                rank, columns, transposed = a.shape[0], shape[-1], True
            scale = _lora_scale(config, module, rank)
            yield (name, lora_delta_at(a, b, scale, ci, columns, transposed),
                   lora_delta_at(a, b, scale, si, columns, transposed), count_non_finite(a, b))
        elif name in biases:
            module, b = biases[name]
            scale = _lora_scale(config, module, parameters[module + ".weight"][1]["lora_A"].shape[0])
            delta = scale * b.float().reshape(-1)
            yield name, delta[ci], delta[si], count_non_finite(b)
        else:  # untouched by the adapter: zero drift, but it still counts (same figures as the merged model)
            yield name, torch.zeros(ci.numel()), torch.zeros(si.numel()), 0


def is_adapter_dir(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "adapter_config.json").is_file()


def scan_adapter(reference: Reference, adapter_dir: Path) -> DriftReport:
    config, tensors = read_adapter(adapter_dir)
    return summarize(reference, adapter_deltas(reference, config, tensors, str(adapter_dir)), str(adapter_dir), "lora",
                     [str(Path(adapter_dir) / "adapter_model.safetensors")])


# ---------------------------------------------------------------- a live module (plain or PEFT-wrapped)

def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Unmerged PEFT LoRA layers by the name of the weight they update (empty for a plain model)."""
    from peft.tuners.lora import LoraLayer

    return {_strip(name) + ".weight": module for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and not module.merged}


def lora_factors(module: torch.nn.Module) -> list[torch.Tensor]:
    """The active adapters' A and B matrices of a live LoRA layer (a NaN there poisons whole rows of ΔW)."""
    out = []
    for adapter in module.active_adapters:
        if adapter in module.lora_A:
            out += [module.lora_A[adapter].weight.detach(), module.lora_B[adapter].weight.detach()]
        elif adapter in getattr(module, "lora_embedding_A", {}):
            out += [module.lora_embedding_A[adapter].detach(), module.lora_embedding_B[adapter].detach()]
    return out


def check_no_lora_bias(lora: dict[str, torch.nn.Module]) -> None:
    """A live LoRA layer that trains a bias moves the layer's bias, which this reader does not follow: refuse."""
    for name, module in lora.items():
        if any(getattr(module, "lora_bias", {}).get(a) for a in module.active_adapters):
            raise ImmunizerError(f"the LoRA layer on {name} trains a bias (lora_bias=True), which the breaker does not "
                                 "watch on a live model; train without lora_bias, or save the adapter and scan the file")


def live_lora_delta(module: torch.nn.Module, index: torch.Tensor, columns: int) -> torch.Tensor:
    delta = torch.zeros(index.numel(), device=index.device)
    for adapter in module.active_adapters:
        if adapter in module.lora_A:
            a, b = module.lora_A[adapter].weight.detach(), module.lora_B[adapter].weight.detach()
            delta += lora_delta_at(a, b, module.scaling[adapter], index, columns, getattr(module, "fan_in_fan_out", False))
        elif adapter in getattr(module, "lora_embedding_A", {}):
            a, b = module.lora_embedding_A[adapter].detach(), module.lora_embedding_B[adapter].detach()
            delta += lora_delta_at(a, b, module.scaling[adapter], index, columns, True)
    return delta


def module_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights by released-model name: PEFT wrappers' prefixes and `base_layer` are taken off, and
    modules_to_save copies stand for the originals."""
    out = {}
    for name, p in model.named_parameters():
        if ".lora_" in name or ".original_module." in name:
            continue
        canonical = re.sub(r"\.modules_to_save\.[^.]+\.", ".", _strip(name).replace(".base_layer.", "."))
        out[canonical] = p
    return out


def sharded_deltas(reference: Reference, name: str, weight: torch.Tensor) -> Gathered:
    """module_deltas for a parameter FSDP has sharded: each process reads the canaries and samples in its own
    piece, and one all-reduce joins the deltas (each entry lives on exactly one process, the others add 0), so
    every process reaches the same verdict without gathering the weights."""
    import torch.distributed as dist  # noqa: PLC0415

    piece, flat = LocalRange.of(weight), local(weight).reshape(-1)
    parts = []
    for index, released in ((reference.canary_index[name], reference.canary_value[name]),
                            (reference.sample_index[name], reference.sample_value[name])):
        index = index.to(flat.device)
        here = piece.holds(index)
        delta = torch.zeros(index.numel(), dtype=torch.float32, device=flat.device)  # + 0 elsewhere: exact
        delta[here] = flat[index[here] - piece.start].float() - released.to(flat.device)[here]
        parts.append(delta)
    parts.append(torch.tensor([float(count_non_finite(flat))], dtype=torch.float32, device=flat.device))
    joined = torch.cat(parts)
    dist.all_reduce(joined)
    joined = joined.cpu()
    canaries = reference.canary_index[name].numel()
    samples = reference.sample_index[name].numel()
    return (name, joined[:canaries], joined[canaries:canaries + samples], int(joined[-1]))


def module_deltas(reference: Reference, tensors: dict[str, torch.Tensor], lora: dict[str, torch.nn.Module]) -> Iterator[Gathered]:
    for name in reference.names:
        weight = tensors[name].detach()
        if is_sharded(weight):  # FSDP (LoRA never runs sharded)
            yield sharded_deltas(reference, name, weight)
            continue
        flat = weight.reshape(-1)
        ci, si = (reference.canary_index[name].to(flat.device), reference.sample_index[name].to(flat.device))
        canary_now, sample_now = flat[ci].float(), flat[si].float()
        non_finite = count_non_finite(flat)
        if name in lora:  # one call for both index sets: this runs at every guard check
            delta = live_lora_delta(lora[name], torch.cat([ci, si]), weight.shape[-1])
            canary_now, sample_now = canary_now + delta[:ci.numel()], sample_now + delta[ci.numel():]
            non_finite += count_non_finite(*lora_factors(lora[name]))
        yield (name, canary_now.cpu() - reference.canary_value[name], sample_now.cpu() - reference.sample_value[name],
               non_finite)


def scan_module(reference: Reference, model: torch.nn.Module, view: tuple[dict, dict] | None = None) -> DriftReport:
    """`view` = (module_tensors(model), lora_layers(model)) from an earlier call: a guard that checks the
    same model again and again walks its modules once."""
    tensors, lora = view or (module_tensors(model), lora_layers(model))
    if view is None:
        check_no_lora_bias(lora)
        check_coverage(reference, {n: tuple(p.shape) for n, p in tensors.items()}, type(model).__name__)
    return summarize(reference, module_deltas(reference, tensors, lora), type(model).__name__,
                     "lora-live" if lora else "module")


# ---------------------------------------------------------------- any path

def scan_path(reference: Reference, path: Path) -> DriftReport:
    """A .safetensors file, a model directory, an immunize output directory or a PEFT adapter directory."""
    path = Path(path)
    if is_adapter_dir(path):
        return scan_adapter(reference, path)
    if path.is_dir() and (path / "manifest.json").is_file() and (path / "model").is_dir():
        path = path / "model"
    if path.is_file() and path.suffix != ".safetensors":
        raise ImmunizerError(f"candidate {path} is not a .safetensors file; pass a model directory, a .safetensors "
                             "file or a PEFT adapter directory (convert .bin checkpoints with save_pretrained)")
    return scan_safetensors(reference, path)
