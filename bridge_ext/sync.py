"""The weight-sync stream as a consumer sees it: receiver contract, receiver helper, host copies.

Receiver contract of :func:`bridge_ext.export_hf_buckets` (and :func:`bridge_ext.export.buckets`):

1. Every rank that iterates the export gets its own sequence of buckets (what its
   ``destination`` gives it); exactly one bucket, the last, has ``is_last=True``. A rank that
   receives nothing gets one empty last bucket.
2. Names are final. Base tensors carry the Hugging Face checkpoint names (hand them to the
   inference engine's ``load_weights`` as they are); adapter tensors carry PEFT's saved keys
   (``base_model.model.<module>.lora_A.weight``, as in ``adapter_model.safetensors``). The
   consumer renames nothing.
3. Each name appears once per export. A base tensor is complete when it arrives and can be
   applied at once. The adapter is complete only at ``is_last``: apply it then, as a whole, so
   that the engine never runs a ``lora_A`` of one step with a ``lora_B`` of another.
4. A tensor is valid until the consumer asks for the next bucket. Tensors may share storage
   with each other (one ``lora_A`` serves ``q_proj``, ``k_proj`` and ``v_proj``): copy what you
   keep. None shares storage with the training model's parameters or buffers unless the export
   was asked for ``zero_copy=True`` (:mod:`bridge_ext.aliasing`); then never modify one in place.
5. Tensors are on the model's device (GPU), or in pinned CPU memory with ``device="cpu"``
   (there, neighbouring small tensors are views of one pinned buffer).

:class:`BucketReceiver` implements the consumer side; :func:`load_into_module` and
:func:`load_into_peft` are the two appliers for a transformers / PEFT model.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator

import torch

from bridge_ext.packing import pack, unpack
from bridge_ext.peft_keys import PEFT_PREFIX

HOST_WINDOW_BYTES = 256 << 20
HOST_AHEAD_BYTES = 2 << 30
PACK_BELOW_BYTES = 16 << 20
PACK_BYTES = 64 << 20

Pairs = Iterable[tuple[str, torch.Tensor]]


class BucketReceiver:
    """Consumer side of a bucketed export: base tensors as they come, the adapter once, whole.

    ``load_weights(pairs)`` gets each bucket's base tensors (Hugging Face names);
    ``load_adapter(tensors)`` gets the complete adapter (PEFT keys -> tensors, copied) at the
    last bucket. Call the receiver with each bucket; it returns True after the last one.
    """

    def __init__(self, load_weights: Callable[[list[tuple[str, torch.Tensor]]], None],
                 load_adapter: Callable[[dict[str, torch.Tensor]], None] | None = None):
        self.load_weights = load_weights
        self.load_adapter = load_adapter
        self._adapter: dict[str, torch.Tensor] = {}

    def __call__(self, bucket) -> bool:
        base = [(name, tensor) for name, tensor in bucket.tensors if not name.startswith(PEFT_PREFIX)]
        if base:
            self.load_weights(base)
        for name, tensor in bucket.tensors:
            if name.startswith(PEFT_PREFIX):
                if name in self._adapter:
                    raise ValueError(f"{name} arrived twice in one export")
                self._adapter[name] = tensor.clone()
        if not bucket.is_last:
            return False
        adapter, self._adapter = self._adapter, {}
        if adapter:
            if self.load_adapter is None:
                raise ValueError("the export holds an adapter, but no load_adapter was given")
            self.load_adapter(adapter)
        return True


def load_into_module(module: torch.nn.Module) -> Callable[[list[tuple[str, torch.Tensor]]], None]:
    """``load_weights`` for a transformers model whose state-dict names are the checkpoint's:
    its parameters and persistent buffers (e.g. DeepSeek-V3's and GLM-4.5's router
    ``e_score_correction_bias``, a buffer kept in float32; a tensor is cast to its target's dtype).
    transformers v5 holds MoE experts fused: export with ``expert_layout="fused"`` for it.

    With a PEFT model pass ``peft_model.get_base_model()``: PEFT's wrapped layers keep the
    base weight at ``<module>.base_layer.weight`` (fused experts, adapted as parameters, at
    ``experts.base_layer.base_layer.gate_up_proj``); those are found under the checkpoint name.
    """
    targets = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if ".lora_" not in name:
            targets[name.replace(".base_layer", "")] = tensor

    def load(pairs: list[tuple[str, torch.Tensor]]) -> None:
        with torch.no_grad():
            for name, tensor in pairs:
                target = targets.get(name)
                if target is None:
                    raise KeyError(f"{name}: the receiving model has no such parameter or buffer")
                target.copy_(tensor)

    return load


def load_into_peft(peft_model, adapter_name: str = "default") -> Callable[[dict[str, torch.Tensor]], None]:
    """``load_adapter`` for a PEFT model: the keys are exactly the ones PEFT saves."""
    from peft import set_peft_model_state_dict

    def load(tensors: dict[str, torch.Tensor]) -> None:
        result = set_peft_model_state_dict(peft_model, tensors, adapter_name=adapter_name)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise KeyError(f"PEFT did not take {unexpected}")

    return load


def to_host(pairs: Pairs, window_bytes: int = HOST_WINDOW_BYTES) -> Iterator[tuple[str, torch.Tensor]]:
    """The stream with GPU tensors copied to pinned CPU memory, overlapped with production.

    Tensors under :data:`PACK_BELOW_BYTES` travel together: consecutive ones are packed on
    the GPU into one message of up to :data:`PACK_BYTES` and copied with one transfer, then
    handed out as views of that pinned copy (a transfer per tensor would cost more than its
    bytes). Copies run on a side stream; a tensor is yielded once its copy is done, while
    production goes on up to ``window_bytes`` of GPU tensors beyond the oldest copy still
    running (so that one large copy does not hold back the tensors behind it).

    A pinned CPU tensor may still be written by copies queued on the current GPU stream (the
    export assembles fused experts there, see :class:`~bridge_ext.engine.TaskConverter`): it
    is yielded once that stream (of the device of the stream's GPU tensors; before the first
    one, the current device) has passed the point where the tensor arrived; it holds no
    GPU memory, and production runs at most :data:`HOST_AHEAD_BYTES` of such tensors ahead.
    Other CPU tensors pass through.
    """
    pending: deque[_HostCopy | _HostWritten] = deque()
    group: list[tuple[str, torch.Tensor]] = []
    group_bytes = on_gpu = on_host = 0
    streams: dict[torch.device, torch.cuda.Stream] = {}
    device = None  # where the stream's GPU tensors are produced
    for name, tensor in pairs:
        copies: list[_HostCopy | _HostWritten] = []
        if tensor.is_cuda:
            device = tensor.device
        if group and (not tensor.is_cuda or tensor.device != group[0][1].device):
            copies.append(_HostCopy(group, streams))
            group, group_bytes = [], 0
        if not tensor.is_cuda and not (torch.cuda.is_initialized() and tensor.is_pinned()):
            pending.extend(copies)
            while pending:
                yield from pending.popleft().wait()
            on_gpu = on_host = 0
            yield name, tensor
            continue
        size = tensor.numel() * tensor.element_size()
        if not tensor.is_cuda:
            copies.append(_HostWritten(name, tensor, device))
        elif size >= PACK_BELOW_BYTES:
            if group:
                copies.append(_HostCopy(group, streams))
                group, group_bytes = [], 0
            copies.append(_HostCopy([(name, tensor)], streams))
        else:
            group.append((name, tensor))
            group_bytes += size
            if group_bytes >= PACK_BYTES:
                copies.append(_HostCopy(group, streams))
                group, group_bytes = [], 0
        for copy in copies:
            pending.append(copy)
            on_gpu += copy.gpu_bytes
            on_host += copy.host_bytes
        while pending and (pending[0].done() or len(pending) > 1 and (
                on_gpu - pending[0].gpu_bytes > window_bytes or on_host - pending[0].host_bytes > HOST_AHEAD_BYTES)):
            done = pending.popleft()
            on_gpu -= done.gpu_bytes
            on_host -= done.host_bytes
            yield from done.wait()
    if group:
        pending.append(_HostCopy(group, streams))
    while pending:
        yield from pending.popleft().wait()


class _HostWritten:
    """A pinned host tensor that copies queued on the current GPU stream may still be writing."""

    def __init__(self, name: str, tensor: torch.Tensor, device: torch.device | None):
        self.name, self.tensor = name, tensor
        self.gpu_bytes, self.host_bytes = 0, tensor.numel() * tensor.element_size()
        self.event = torch.cuda.current_stream(device).record_event()

    def done(self) -> bool:
        return self.event.query()

    def wait(self) -> Iterator[tuple[str, torch.Tensor]]:
        self.event.synchronize()
        yield self.name, self.tensor


class _HostCopy:
    """One device-to-host transfer on the device's copy stream: one tensor, or several packed."""

    def __init__(self, pairs: list[tuple[str, torch.Tensor]], streams: dict[torch.device, torch.cuda.Stream]):
        self.names = [name for name, _ in pairs]
        tensors = [tensor for _, tensor in pairs]
        source = tensors[0] if len(tensors) == 1 else pack(tensors)
        stream = streams.get(source.device)
        if stream is None:
            stream = streams[source.device] = torch.cuda.Stream(device=source.device)
        self.host = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
        self.specs = [(tuple(tensor.shape), tensor.dtype) for tensor in tensors] if len(tensors) > 1 else None
        self.gpu_bytes, self.host_bytes = self.host.numel() * self.host.element_size(), 0
        stream.wait_stream(torch.cuda.current_stream(source.device))
        with torch.cuda.stream(stream):
            self.host.copy_(source, non_blocking=True)
        source.record_stream(stream)
        self.event = stream.record_event()

    def done(self) -> bool:
        return self.event.query()

    def wait(self) -> Iterator[tuple[str, torch.Tensor]]:
        self.event.synchronize()
        yield from zip(self.names, [self.host] if self.specs is None else unpack(self.host, self.specs))
