"""Distributed data-parallel training (issue 14) on PyTorch's own machinery: ``torch.distributed`` process
groups (gloo on the CPU, nccl on CUDA), ``DistributedDataParallel``, ``DistributedSampler`` and torch's
elastic launcher (what ``torchrun`` runs), never a home-made spawner.

Conventions every task on the shared loop follows:

* The global batch is the per-process ``--batch-size`` times the number of processes (``--nproc`` x
  nodes); the learning rate is applied as given to that global batch (DDP averages the gradients), so
  to keep a single-process run's dynamics, divide ``--batch-size`` by the process count and keep ``--lr``.
* Every rank seeds the model with ``seed`` (DDP also broadcasts rank 0's weights), then, each epoch, its
  augmentation and dropout from ``seed``, the epoch and its rank; shuffling is
  ``DistributedSampler(seed=seed)`` with ``set_epoch``.
* Training figures are averaged over the ranks; validation and the test run on rank 0 alone (the
  whole validation set) and the figures are broadcast, so every rank takes the same best/early-stop
  decision. Only rank 0 writes checkpoints, ``metrics.jsonl`` and progress bars.
* Checkpoints hold the unwrapped module's ``state_dict`` (no ``module.`` prefixes): the same file a
  single process writes.
* Collectives time out after ``timeout_s``; a rank that dies ends the run with one line (the launcher
  stops the others at once; ranks on other nodes stop at the timeout).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from dlpipe.runtime.errors import DlpipeError, UsageError

DEFAULT_TIMEOUT_S = 300.0
# tests only: "RANK:EPOCH" makes that rank exit abruptly (os._exit(3)) as that epoch starts
FAULT_ENV = "DLPIPE_TEST_KILL_RANK"


class DistributedRunError(DlpipeError):
    """A distributed run that stopped because one of its processes failed or timed out."""


# ------------------------------------------------------------------------------------------ who am I

def active() -> bool:
    """Whether this process is one rank of an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 outside a distributed run)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """How many processes train together (1 outside a distributed run)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes files and shows progress (rank 0, or the only process)."""
    return rank() == 0


def launched() -> bool:
    """Whether a launcher (``torchrun``, ``dlpipe train --nproc``) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def backend_for(device: torch.device) -> str:
    """The collective backend of a device: nccl for CUDA, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def training_device() -> torch.device:
    """Where this rank trains: the shared loop trains on the CPU (its models and batches stay there)."""
    return torch.device("cpu")


# ------------------------------------------------------------------------------------ set up and down

@contextlib.contextmanager
def session(timeout_s: float | None = None) -> Iterator[None]:
    """Join the process group the launcher describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...), with a
    timeout on every collective, and leave it at the end; nothing when this is a single process."""
    if not launched() or dist.is_initialized():
        yield
        return
    device = training_device()
    if device.type == "cuda":  # guarded: only when the loop really trains on CUDA
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend_for(device), timeout=timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S))
    try:
        yield
    finally:
        dist.destroy_process_group()


def seed_rank(seed: int, epoch: int) -> None:
    """Reseed this rank's global generator from ``seed``, the epoch and the rank as an epoch starts
    (augmentation and dropout differ per rank, reproducibly, and a resumed run continues alike); nothing
    in a single process, whose random stream stays what it always was."""
    if active():
        torch.manual_seed(seed + 10_007 * (epoch + 1) + rank())


def fault_point(epoch: int) -> None:
    """Tests only: exit abruptly when :data:`FAULT_ENV` names this rank and ``epoch`` (a killed rank)."""
    spec = os.environ.get(FAULT_ENV)
    if spec and active() and spec == f"{rank()}:{epoch}":
        sys.stderr.flush()
        os._exit(3)


# ---------------------------------------------------------------------------------------- the model

def check_sync_bn(sync_bn: bool) -> None:
    """Refuse ``--sync-bn`` where torch's ``SyncBatchNorm`` cannot run (it needs GPU tensors)."""
    if sync_bn and training_device().type == "cpu":
        raise UsageError("--sync-bn: torch's SyncBatchNorm runs on GPUs only and this run trains on the CPU; "
                         "leave it out (each process then keeps its own batch statistics)")


def wrap(model: nn.Module, sync_bn: bool = False) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` (batch norm converted to ``SyncBatchNorm`` first when
    ``sync_bn``); ``model`` itself outside a distributed run. Build it after freezing: DDP reduces the
    gradients of the parameters that require them when it is made."""
    if not active():
        return model
    if sync_bn:
        check_sync_bn(sync_bn)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device = training_device()
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (checkpoints store its ``state_dict``: no ``module.`` prefixes)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def call(model: nn.Module, method: str, *args: Any) -> Any:
    """``model.<method>(*args)`` run through DDP's forward when wrapped, so its gradients are reduced
    (DDP synchronises only what its ``forward`` computed; a detector's ``losses`` is not ``forward``)."""
    if not isinstance(model, DistributedDataParallel):
        return getattr(model, method)(*args)
    inner = model.module
    inner.forward = getattr(inner, method)  # an instance attribute shadows the class's forward for one call
    try:
        return model(*args)
    finally:
        del inner.forward


# ----------------------------------------------------------------------------------------------- data

def loader(dataset, batch_size: int, seed: int, collate_fn=None) -> DataLoader:
    """A shuffled training loader over this rank's shard (``DistributedSampler``, seeded; equal shard sizes
    on every rank, so every rank takes the same number of steps)."""
    sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn)


def set_epoch(train_loader, epoch: int) -> None:
    """Give the loader's ``DistributedSampler`` the epoch (a new shuffle each epoch, the same on every rank)."""
    sampler = getattr(train_loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


def shard(order: torch.Tensor) -> torch.Tensor:
    """This rank's part of a permutation every rank drew alike: padded by wrapping to a multiple of the
    world size, then every ``world``-th item (what ``DistributedSampler`` does)."""
    world = world_size()
    if world == 1:
        return order
    total = -(-len(order) // world) * world
    padded = torch.cat([order, order[:total - len(order)]]) if total > len(order) else order
    return padded[rank()::world]


def local_count(n: int) -> int:
    """Items of ``n`` this rank sees per epoch."""
    return -(-n // world_size())


# -------------------------------------------------------------------------------------------- figures

def reduce_figures(figures: dict[str, Any]) -> dict[str, Any]:
    """Training figures over all ranks: rates (``*_per_s``) summed, ``seconds`` the slowest rank's, other
    numbers averaged (every rank has an equal shard); the figures themselves outside a distributed run."""
    if not active():
        return figures
    keys = sorted(k for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    values = torch.tensor([float(figures[k]) for k in keys], dtype=torch.float64)
    summed, slowest = values.clone(), values.clone()
    dist.all_reduce(summed)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    out = dict(figures)
    for i, k in enumerate(keys):
        out[k] = (slowest[i] if k == "seconds" else summed[i] if k.endswith("_per_s")
                  else summed[i] / world_size()).item()
    return out


def from_main(compute: Callable[[], Any]) -> Any:
    """``compute()`` on rank 0 and its result on every rank (broadcast); ``compute()`` outside a
    distributed run."""
    if not active():
        return compute()
    box = [compute() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------------------- launching

def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any], every_rank: bool) -> Any:
    """A launched worker: run ``fn``; a user-facing error comes back as a value, so the launcher can raise
    it as one line instead of a worker's traceback. Ranks other than 0 return None unless ``every_rank``."""
    try:
        result = fn(*args, **kwargs)
    except DlpipeError as exc:
        return {"__error__": (type(exc).__module__, type(exc).__name__, str(exc))}
    return result if every_rank or int(os.environ.get("RANK", "0")) == 0 else None  # (the group is gone now)


def _raise_returned(value: Any) -> Any:
    if isinstance(value, dict) and "__error__" in value:
        module, name, message = value["__error__"]
        error = getattr(sys.modules.get(module), name, DistributedRunError)
        try:
            raise error(message)
        except TypeError:  # an error class with another signature
            raise DistributedRunError(message) from None
    return value


def _failure_line(exc) -> str:
    """One line from torch's ChildFailedError: which rank failed first and how."""
    rank_, failure = exc.get_first_failure()
    how = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with code {failure.exitcode}"
    message = failure.message.get("message", "") if isinstance(failure.message, dict) else str(failure.message or "")
    last = next((line.strip() for line in reversed(message.splitlines()) if line.strip()), "")
    last = last.split(". ")[0]  # gloo's messages go on with advice
    # a worker that exited without a Python error has only torch's "To enable traceback see ..." here
    why = f" ({last})" if last and not any(s in last for s in ("error_file", "<N/A>", "enable traceback")) else ""
    return (f"distributed training stopped: rank {rank_} (pid {failure.pid}) {how}{why}; the launcher ended this "
            "machine's other processes (those on other machines stop at the collective timeout)")


def launch(fn: Callable[..., Any], *args: Any, nproc: int, nnodes: int = 1, rdzv_endpoint: str | None = None,
           rdzv_id: str = "dlpipe", every_rank: bool = False, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` in ``nproc`` processes on this machine (x ``nnodes`` machines meeting at
    ``rdzv_endpoint``) through torch's elastic launcher (``torch.distributed.launcher.api.elastic_launch``,
    what ``torchrun`` runs), with no restarts.

    Returns:
        Rank 0's result, or None on a node that does not hold rank 0; with ``every_rank``, this node's
        ``{rank: result}``.

    Raises:
        DistributedRunError: a process failed (one line: which rank and how); a user-facing error a rank
            raised is raised again as itself.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1 or nnodes < 1:
        raise UsageError(f"--nproc and --nnodes must be at least 1, got {nproc} and {nnodes}")
    if nnodes > 1 and not rdzv_endpoint:
        raise UsageError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
    config = LaunchConfig(min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=nproc, run_id=rdzv_id,
                          rdzv_backend="c10d", rdzv_endpoint=rdzv_endpoint or f"127.0.0.1:{free_port()}",
                          max_restarts=0, monitor_interval=0.2, start_method="spawn")
    # a killed worker leaves a semaphore behind, which multiprocessing's resource tracker (a process of its
    # own, started now, inheriting the environment) would report as a warning after the error line
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning:multiprocessing.resource_tracker")
    quiet = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.multiprocessing")]
    levels = [log.level for log in quiet]
    for log in quiet:  # the launcher logs a failure as pages of tracebacks; it is reported as one line below
        log.setLevel(logging.CRITICAL)
    try:
        results = elastic_launch(config, _entry)(fn, args, kwargs, every_rank)
    except ChildFailedError as exc:
        raise DistributedRunError(_failure_line(exc)) from None
    except Exception as exc:  # rendezvous errors: an endpoint nobody hosts, a node that never came or left
        if isinstance(exc, DlpipeError):
            raise
        if "Rendezvous" in type(exc).__name__:
            raise DistributedRunError(f"distributed training stopped: the rendezvous at {config.rdzv_endpoint} failed "
                                      f"({type(exc).__name__}): a node stopped or never came, or nobody hosts it"
                                      ) from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DistributedRunError(f"distributed launch failed ({type(exc).__name__}: {first})") from None
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    values = [_raise_returned(v) for v in results.values()]
    if every_rank:
        return dict(zip(results, values))
    return _raise_returned(results[0]) if 0 in results else next((v for v in values if v is not None), None)
