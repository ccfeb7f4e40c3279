"""Data parallelism for `python train.py --nproc-per-node 4 ...` (or `torchrun --nproc-per-node 4
train.py ...`): each process holds the whole model (4-bit where asked) on its own GPU, trains on its
share of every optimizer step's pairs, and DistributedDataParallel averages the gradients once per
step. A plain `python train.py` is a world of one: nothing here acts."""
import logging
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F


def setup():
    """(rank, world size, device) from torchrun's environment; joins the process group when there
    are several processes (nccl on GPUs, gloo on CPUs) and silences all but the first."""
    world = launched_world_size()
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    if world > 1 and not dist.is_initialized():
        if device != "cpu":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device != "cpu" else "gloo")
    # one voice: the others' output would repeat it (their errors still show); open until exit
    if rank() > 0:
        import datasets
        import transformers
        sys.stdout = open(os.devnull, "w")
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    return rank(), world, device


def launch(script, argv, processes):
    """`script argv` in `processes` processes on this machine, through torchrun's own launcher in
    this process; the exit status of the first process to fail, else 0. Ctrl-C or SIGTERM reaches
    every process, which finishes its step and saves: torchrun alone would kill them 30 s later
    (its --shutdown-timeout) and end with its traceback; here they get an hour, and the launcher
    ends as one process would (128 + the signal)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run
    # the processes say what happened, once; torchrun's logger would repeat it per process
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(["--standalone", "--nproc-per-node", str(processes),
                        "--shutdown-timeout", "3600", script, *argv]))
    except SignalException as error:
        return 128 + int(error.sigval)
    except ChildFailedError as error:
        code = error.get_first_failure()[1].exitcode
        # killed by a signal: a negative code
        return code if code > 0 else 128 - code
    return 0


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def launched_world_size():
    """The processes torchrun started (before they join a group)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def shard(items):
    """This process's contiguous slice of `items`: ranks 0, 1, ... in order hold the whole list in
    order, so the gathered per-item numbers are those of a single process."""
    bounds = [len(items) * r // world_size() for r in range(world_size() + 1)]
    return items[bounds[rank()]:bounds[rank() + 1]]


def share(pairs):
    """This process's pairs of a step, each weighing world/pairs in the mean loss (DDP averages over
    processes); if none are left, one pair of weight 0, as all must join the all-reduce."""
    mine = shard(pairs)
    return (mine, world_size() / len(pairs)) if mine else (pairs[:1], 0.0)


def gather(values):
    """(k, n_rank) tensors of every process -> one (k, n_0 + n_1 + ...) in rank order, on all."""
    if world_size() == 1:
        return values
    sizes = [torch.zeros(1, dtype=torch.long, device=values.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([values.shape[-1]], device=values.device))
    width = max(int(size) for size in sizes)
    parts = [torch.empty(*values.shape[:-1], width, dtype=values.dtype, device=values.device)
             for _ in sizes]
    dist.all_gather(parts, F.pad(values, (0, width - values.shape[-1])).contiguous())
    return torch.cat([part[..., :int(size)] for part, size in zip(parts, sizes, strict=True)], -1)


def total(value):
    """The sum of a tensor over all processes (in place)."""
    if world_size() > 1:
        dist.all_reduce(value)
    return value


def agree(*flags):
    """The largest of each integer flag over all processes, so that all take the same decision."""
    if world_size() == 1:
        return flags
    values = torch.tensor(flags, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return tuple(values.tolist())


def objects(value):
    """[value of rank 0, value of rank 1, ...] on every process (small ones: flags, RNG states)."""
    if world_size() == 1:
        return [value]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier():
    if world_size() > 1:
        dist.barrier()


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()
