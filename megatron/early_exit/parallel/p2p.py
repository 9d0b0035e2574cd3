"""Device-agnostic point-to-point communication between neighbouring pipeline stages.

Every transfer is a ``torch.distributed.batch_isend_irecv`` of ``P2POp``s on an explicit
process group, waited on before returning; receive buffers are allocated from the shape and
dtype the caller passes, on the device the object was built with. Nothing here calls
torch.cuda, so the same code runs on gloo/CPU and NCCL/GPU (megatron-core's
p2p_communication does not, see docs/design.md "CPU")::

    p2p = PipelineP2P(group, prev_rank=prev_global, next_rank=next_global, device=device)
    x = p2p.recv_forward(shape, torch.bfloat16)          # from the previous stage
    g = p2p.send_forward_recv_backward(y, shape, y.dtype)  # one batch, both directions

Ranks are GLOBAL ranks (as ``P2POp`` wants); ``None`` marks a missing neighbour (first or
last stage), and calling a method that needs it raises. Within one batch the ops are posted
in the fixed order send-next, recv-prev, send-prev, recv-next, so when the previous and the
next stage are the same rank (a 2-stage ring under virtual pipelining) activations and
gradients still pair up in order. Executors post a plan's fused actions
(``schedule_plan.comm_batches``) through :meth:`PipelineP2P.exchange`.

NCCL note (torch docs): the first batch_isend_irecv on a group must involve all its ranks,
and the current CUDA device must be set by the caller. Test (gloo, 4 ranks):
``python -m pytest -q tests/distributed/test_p2p.py``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

Shape = Sequence[int]
RecvSpec = Optional[tuple[Shape, torch.dtype]]


class PipelineP2P:
    """Send/receive activations and gradients to/from the neighbouring pipeline stages."""

    def __init__(self, group, prev_rank: int | None, next_rank: int | None,
                 device: torch.device | str = "cpu"):
        self.group = group
        self.prev_rank = prev_rank
        self.next_rank = next_rank
        self.device = torch.device(device)

    # -- the one primitive ---------------------------------------------------------------
    def exchange(
        self,
        *,
        send_next: torch.Tensor | None = None,
        send_prev: torch.Tensor | None = None,
        recv_prev: RecvSpec = None,
        recv_next: RecvSpec = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Post up to four ops as one batch and wait for all of them.

        ``recv_prev`` / ``recv_next`` are (shape, dtype) of the tensor to receive. Returns
        (tensor from prev, tensor from next), None where nothing was received.
        """
        ops: list[dist.P2POp] = []
        got_prev = got_next = None
        if send_next is not None:
            ops.append(self._op(dist.isend, self._sendable(send_next), self._peer("next")))
        if recv_prev is not None:
            got_prev = self._buffer(recv_prev)
            ops.append(self._op(dist.irecv, got_prev, self._peer("prev")))
        if send_prev is not None:
            ops.append(self._op(dist.isend, self._sendable(send_prev), self._peer("prev")))
        if recv_next is not None:
            got_next = self._buffer(recv_next)
            ops.append(self._op(dist.irecv, got_next, self._peer("next")))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        return got_prev, got_next

    # -- named forms (megatron's vocabulary) -----------------------------------------------
    def send_forward(self, tensor: torch.Tensor) -> None:
        self.exchange(send_next=tensor)

    def recv_forward(self, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        return self.exchange(recv_prev=(shape, dtype))[0]

    def send_backward(self, grad: torch.Tensor) -> None:
        self.exchange(send_prev=grad)

    def recv_backward(self, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        return self.exchange(recv_next=(shape, dtype))[1]

    def send_forward_recv_backward(
        self, tensor: torch.Tensor, shape: Shape, dtype: torch.dtype
    ) -> torch.Tensor:
        """Send an activation to the next stage and receive the gradient it sends back."""
        return self.exchange(send_next=tensor, recv_next=(shape, dtype))[1]

    def send_backward_recv_forward(
        self, grad: torch.Tensor, shape: Shape, dtype: torch.dtype
    ) -> torch.Tensor:
        """Send a gradient to the previous stage and receive its next activation."""
        return self.exchange(send_prev=grad, recv_prev=(shape, dtype))[0]

    # -- helpers -------------------------------------------------------------------------
    def _peer(self, which: str) -> int:
        rank = self.next_rank if which == "next" else self.prev_rank
        if rank is None:
            raise RuntimeError(f"this pipeline stage has no {which} stage to talk to")
        return rank

    def _op(self, fn, tensor: torch.Tensor, peer: int) -> dist.P2POp:
        return dist.P2POp(fn, tensor, peer, self.group)

    def _sendable(self, tensor: torch.Tensor) -> torch.Tensor:
        dev = tensor.device
        if dev.type != self.device.type or (
            self.device.index is not None and dev.index != self.device.index
        ):
            raise ValueError(f"tensor on {tensor.device}, p2p set up for {self.device}")
        return tensor.detach().contiguous()

    def _buffer(self, spec: tuple[Shape, torch.dtype]) -> torch.Tensor:
        shape, dtype = spec
        return torch.empty(tuple(shape), dtype=dtype, device=self.device)
