"""torch.distributed for the loop: the torchrun process group, DDP/FSDP2 wrapping, gathers.

Single process when torchrun's environment (WORLD_SIZE > 1) is absent; every function here is
then a no-op. Every rank builds the same global batch (micro_batch_size * grad_accum *
world_size rows, a pure function of seed and epoch) and takes its own contiguous rows of each
micro-step, so ranks never overlap, no row is lost, and the batch composition (hence the
result) does not depend on how the rows are spread over processes.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as td
from torch import Tensor, nn

from nanotune.errors import NanotuneError

T = TypeVar("T")


def _active() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if _active() else 0


def world_size() -> int:
    return td.get_world_size() if _active() else 1


def is_main() -> bool:
    """Only rank 0 logs and writes files (under torchrun also before and after the group)."""
    return rank() == 0 if _active() else os.environ.get("RANK", "0") == "0"


def launched() -> bool:
    """True in a process started by torchrun (or anything setting its env vars) with >1 ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def device_for(name: str) -> torch.device:
    """The device of this process: under torchrun, 'auto'/'cuda' mean cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise NanotuneError(
            f"train.device: {name!r} requested but CUDA is not available; use device: cpu or auto"
        )
    if name == "cuda" and (launched() or _active()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


@contextlib.contextmanager
def session(device: str = "auto", timeout_s: float = 300.0) -> Iterator[None]:
    """Join torchrun's process group for the body: nccl on CUDA, gloo on CPU, initialised from
    the env vars torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK).

    A failure on this rank leaves the group at once (its peers then fail fast or are stopped by
    torchrun) and a lost peer becomes a one-line NanotuneError instead of a hang: collectives
    give up after `timeout_s`.
    """
    started = False
    if launched() and not _active():
        dev = device_for(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        td.init_process_group(
            "nccl" if dev.type == "cuda" else "gloo",
            timeout=timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
        started = True
    try:
        yield
    except NanotuneError as e:
        if world_size() > 1 and not str(e).startswith("rank "):
            raise NanotuneError(f"rank {rank()}: {e}") from e
        raise
    except (td.DistError, RuntimeError) as e:
        if world_size() > 1 and _peer_lost(e):
            # gloo's text starts with a source location and ends in generic advice.
            first = re.sub(r"^\[[^\]]*\] ", "", str(e).strip().splitlines()[0])
            first = first.split(". ")[0][:200]
            raise NanotuneError(
                f"rank {rank()}: lost contact with the other processes ({first}); another rank "
                "failed or was killed (see its error); continue from the last checkpoint with "
                "--resume"
            ) from e
        raise
    finally:
        if started:
            # Free what still holds the group (a DDP wrapper in a reference cycle) while the
            # interpreter is whole: a gloo group whose worker threads outlive it is torn down
            # during finalization, which can abort the process after a finished run (seen once,
            # SIGABRT after `done:` in a resumed 2-rank run on a loaded machine).
            gc.collect()
            td.destroy_process_group()


def _peer_lost(e: BaseException) -> bool:
    """A collective failed because a peer went away or timed out (not a bug on this rank)."""
    if isinstance(e, td.DistError):
        return True
    text = str(e).lower()
    return any(s in text for s in ("gloo", "connection closed", "connection reset", "timed out"))


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and hand its result to every rank; its NanotuneError is raised on
    every rank (e.g. checks of the run directory, which only rank 0 may create)."""
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except NanotuneError as e:
            error = str(e)
    if _active():
        box = [result, error]
        td.broadcast_object_list(box, src=0)
        result, error = box
    if error is not None:
        raise NanotuneError(error)
    return result


def main_first(fn: Callable[[], T]) -> T | None:
    """Run `fn` on rank 0 while the other ranks wait for it however long it takes (on a gloo
    group of their own, without the collective timeout: tokenizing a large dataset may take
    longer); its result on rank 0, None elsewhere. Any failure on rank 0 fails every rank: a
    NanotuneError with its message, anything else as `rank 0 failed: ...`."""
    if not _active():
        return fn()
    group = td.new_group(backend="gloo", timeout=timedelta(days=7))
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except BaseException as e:  # handed to the waiting ranks before it goes on
            error = e
    box: list[Any] = [None]
    if error is not None:
        box = [(isinstance(error, NanotuneError), str(error) or type(error).__name__)]
    td.broadcast_object_list(box, src=0, group=group)
    td.destroy_process_group(group)
    if error is not None:
        raise error
    if box[0] is not None:
        ours, message = box[0]
        raise NanotuneError(message if ours else f"rank 0 failed: {message}")
    return result


def all_reduce_sum(x: Tensor) -> Tensor:
    if _active():
        td.all_reduce(x, op=td.ReduceOp.SUM)
    return x


def gather_objects(obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order (a one-element list in a single process)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * world_size()
    td.all_gather_object(out, obj)
    return out


def rank_rows(batch: dict[str, object]) -> dict[str, object]:
    """This rank's contiguous share of a global batch's rows (python ints are global counts)."""
    W = world_size()
    if W == 1:
        return batch
    n = len(batch["input_ids"])
    lo, hi = rank() * n // W, (rank() + 1) * n // W
    return {k: v[lo:hi] for k, v in batch.items() if isinstance(v, Tensor)}


def barrier() -> None:
    if _active():
        td.barrier()


# --- wrapping the model --------------------------------------------------------------------------


class Engine(nn.Module):
    """Runs an objective function on the model inside `forward`.

    DDP and FSDP2 act through the wrapper's forward (DDP prepares its gradient reduction there;
    FSDP2 gathers the root's parameters there), while objectives call `model.hidden` and
    `model.lm_head` directly: routing every pass through this forward keeps both correct.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[[nn.Module, Any], Any], batch: Any) -> Any:
        return fn(self.model, batch)


def resolve_strategy(strategy: str) -> str:
    """'none' in one process; 'auto' is DDP with several."""
    if world_size() == 1:
        return "none"
    return "ddp" if strategy == "auto" else strategy


def wrap(model: nn.Module, strategy: str, device: torch.device, find_unused: bool) -> nn.Module:
    """An `Engine` over `model`, under DDP or FSDP2 (`fully_shard`) when there are several ranks.

    FSDP2 shards each member of the model's layer lists (the transformer blocks) as a unit and
    the rest (embeddings, final norm, head, classifier) with the root, so one block's full
    weights exist at a time. The model's own parameter names do not change.
    find_unused: some trainable parameters take no part in the loss (DDP must not wait for them).
    """
    engine = Engine(model)
    strategy = resolve_strategy(strategy)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        _check_fsdp(model)
        for layer in _layers(model):
            fully_shard(layer)
        fully_shard(engine)
        return engine
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Frozen weights are identical on every rank (same file, same seed) and may be NF4,
        # which DDP's start-up broadcast cannot take: only trainable tensors are synchronised.
        frozen = [n for n, p in engine.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in engine.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(engine, frozen)
        return DDP(
            engine,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused,
        )
    return engine


def _layers(model: nn.Module) -> list[nn.Module]:
    """Members of the outermost nn.ModuleLists: the repeated blocks FSDP2 shards one by one."""
    found: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and not any(name.startswith(p + ".") for p, _ in found):
            found.append((name, m))
    return [layer for _, m in found for layer in m]


def _check_fsdp(model: nn.Module) -> None:
    """NF4 weights shard only when their rows and packed parts split evenly over the ranks
    (torchao's NF4 split); anything else would fail deep inside FSDP."""
    W = world_size()
    for name, p in model.named_parameters():
        if type(p).__name__ != "NF4Tensor":
            continue
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import (
            _INNER_TENSOR_NAMES_FOR_SHARDING as parts,
        )

        sizes = [p.size(0)] + [getattr(p, a).numel() for a in parts]
        if any(s % W for s in sizes):
            raise NanotuneError(
                f"train.strategy fsdp: the NF4 weight {name} (rows and packed parts {sizes}) "
                f"does not split evenly over {W} processes; use train.strategy: ddp, or a "
                "number of processes that divides every NF4 weight"
            )


@contextlib.contextmanager
def grad_sync(engine: nn.Module, sync: bool) -> Iterator[None]:
    """Forward and backward of one micro-step; without `sync`, no gradient communication
    (DDP `no_sync`, FSDP2 `set_requires_gradient_sync(False)`): inner accumulation steps only
    add to local gradients and the last one reduces them all at once."""
    if sync:
        yield
        return
    if hasattr(engine, "no_sync"):
        with engine.no_sync():
            yield
    elif hasattr(engine, "set_requires_gradient_sync"):
        engine.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            engine.set_requires_gradient_sync(True)
    else:
        yield


@contextlib.contextmanager
def full_params(engine: nn.Module) -> Iterator[None]:
    """Inside, rank 0's model holds whole plain parameters on the CPU (FSDP2 shards gathered,
    e.g. to save the final model; every rank must enter, the others hold nothing extra).
    A no-op without FSDP2."""
    from torch.distributed.tensor import DTensor

    reshard(engine)
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    whole: dict[int, nn.Parameter] = {}
    for module in engine.modules():
        for name, p in list(module._parameters.items()):
            if not isinstance(p, DTensor):
                continue
            if id(p) not in whole:  # a tied tensor is gathered once, in the same order everywhere
                full = p.detach().full_tensor().cpu()
                whole[id(p)] = nn.Parameter(full, requires_grad=p.requires_grad) if is_main() else p
            if is_main():
                swapped.append((module, name, p))
                module._parameters[name] = whole[id(p)]
    try:
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def reshard(engine: nn.Module) -> None:
    """Return FSDP2 modules to their sharded parameters. A forward without backward (evaluation)
    leaves the root's parameters gathered in a buffer that later passes may free."""
    from torch.distributed.fsdp import FSDPModule

    for m in engine.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_tensor(t: Tensor) -> Tensor:
    """The whole value of a possibly sharded tensor (a collective for a DTensor)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like(value: Tensor, param: Tensor) -> Tensor:
    """`value` (a whole tensor, the same on every rank) laid out as `param` (sharded or not)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    value = value.to(device=param.device, dtype=param.dtype)
    if isinstance(param, DTensor):
        return distribute_tensor(value, param.device_mesh, param.placements)
    return value
