"""A process group and Megatron parallel state on CPU (gloo), for one or more processes.

Support for the demo and the tests, not the exporter (which runs in the caller's own job).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist


@contextmanager
def megatron_parallel(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    virtual_pipeline: int | None = None,
    expert_parallel: int = 1,
    expert_tensor_parallel: int | None = None,
    *,
    port: int | None = None,
) -> Iterator[None]:
    """Initialise gloo (a single process unless launched by torchrun) and Megatron's groups.

    Uses the inference RNG tracker: Megatron's default CUDA RNG tracker needs CUDA.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as megatron_random

    created = False
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port or _free_port()))
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        created = True
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline,
        expert_model_parallel_size=expert_parallel,
        expert_tensor_parallel_size=expert_tensor_parallel,
    )
    megatron_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
