"""megatron-core's optimizer on GPU: DDP gradient buffers + FP32Optimizer or DistributedOptimizer.

``--optimizer-backend megatron`` (the default on CUDA) trains with megatron-core's own
optimizer stack instead of torch AdamW plus our all-reduces:

- each model chunk gets a ``megatron.core.distributed.DistributedDataParallel`` wrapper only for
  its gradient buffers: backward hooks add every ``param.grad`` into a contiguous fp32
  ``param.main_grad`` buffer, ``finish_grad_sync`` all-reduces (or reduce-scatters) it over the
  data-parallel group, averaging. Our model chunks are still called directly (the schedule
  executor calls each chunk's ``forward``, not the wrapper), the hooks fire all the same;
- ``get_megatron_optimizer`` builds the optimizer: FP32Optimizer over the fp32 parameters, or
  with ``--use-distributed-optimizer`` the DistributedOptimizer, which keeps only this DP rank's
  shard of the AdamW state and all-gathers the updated parameters after the step. It clips by
  the global grad norm (copies of the tied embedding carry ``shared`` and TP replicas are
  counted once, as in parallel/grads.py);
- ``--bf16`` stays autocast with fp32 parameters, so the optimizer runs with ``bf16=False``.

The sequence-parallel and tied-embedding all-reduces (parallel/grads.py) run on ``main_grad``
*before* the DP sync: all three are sums, so the order does not change the result, and the
tied gradient never depends on how DP shards the buffer.

Checkpoints keep their layout-independent format: ``full_param_states`` assembles each
parameter's whole AdamW state (a DP all-reduce of the shards for the distributed optimizer) and
``load_full_param_states`` cuts this rank's shard back out (checkpoint/tensors.py calls both),
so a checkpoint written with one backend loads with the other and reshards as before.

Needs CUDA (megatron-core's optimizer wrappers allocate on 'cuda'); on CPU the trainer uses
trainer/optimizer.py. GPU test: ``python -m pytest -q tests/gpu``.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch
import torch.distributed as dist

from megatron.early_exit.config import ConfigError
from megatron.early_exit.parallel.grads import finalize_grads


class MegatronCoreOptimizer:
    """The trainer's optimizer interface over megatron-core's DDP buffers and optimizer."""

    def __init__(self, chunks: List[torch.nn.Module], ctx, train_cfg):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        check_supported(chunks, ctx, train_cfg)
        t = train_cfg
        self.distributed = t.use_distributed_optimizer
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, overlap_param_gather=False,
            use_distributed_optimizer=self.distributed)
        self.wrapped = [DistributedDataParallel(config=m.config, ddp_config=ddp_config, module=m,
                                                disable_bucketing=i > 0)
                        for i, m in enumerate(chunks)]
        opt_config = OptimizerConfig(
            optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
            clip_grad=t.clip_grad, bf16=False, fp16=False, params_dtype=torch.float32,
            use_distributed_optimizer=self.distributed)
        self.optimizer = get_megatron_optimizer(opt_config, self.wrapped, use_gloo_process_groups=False)
        self.parts = list(getattr(self.optimizer, "chained_optimizers", [self.optimizer]))
        # megatron's groups carry wd_mult (0 for biases, norms, 1-D) that its own LR scheduler
        # applies each step; we set lr ourselves (trainer/loop.py), so apply it once here.
        for group in self.param_groups:
            group["weight_decay"] = t.weight_decay * group.get("wd_mult", 1.0)

    # ------------------------------------------------------------------ training step
    @property
    def param_groups(self) -> List[dict]:
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        for ddp in self.wrapped:
            ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    def finalize_and_step(self, chunks, ctx) -> float:
        """SP and tied all-reduces on main_grad, DP sync, clip and update; returns the norm."""
        finalize_grads(chunks, ctx, grad_attr="main_grad", data_parallel=False)
        for ddp in self.wrapped:
            ddp.finish_grad_sync()
        ok, norm, _ = self.optimizer.step()
        if not ok:
            raise RuntimeError("megatron-core's optimizer skipped the update (non-finite gradients)")
        if norm is None:  # --clip-grad 0: megatron does not compute the norm
            norm = self.optimizer.get_grad_norm()
        return float(norm)

    # ------------------------------------------------------------------ checkpoints
    def _shards(self):
        """(model param, inner torch optimizer, state key, flat start, flat end) per parameter
        whose state lives (at least partly) on this rank."""
        for part in self.parts:
            inner = part.optimizer
            if self.distributed:
                for model_group, shard_group in zip(part.model_fp32_groups, part.shard_fp32_groups):
                    for param, shard in zip(model_group, shard_group):
                        rng = part._get_model_param_range_map(param)["param"]
                        yield param, inner, shard, rng.start, rng.end
            else:
                for group in inner.param_groups:
                    for param in group["params"]:
                        yield param, inner, param, 0, param.numel()

    def full_param_states(self, params: Iterable[torch.nn.Parameter]) -> Dict[int, dict]:
        """id(param) -> {'step', 'exp_avg', 'exp_avg_sq'} with whole tensors, for ``params``
        that have state. Collective over the DP group with the distributed optimizer."""
        shards = {id(p): (inner, key, a, b) for p, inner, key, a, b in self._shards()}
        out = {}
        for p in params:  # every DP rank walks the same parameters (collectives below)
            inner, key, a, b = shards.get(id(p), (None, None, 0, 0))
            local = adam_state(inner, key) if inner is not None else {}
            entry = self._gather_state(p, local, a, b) if self.distributed else local
            if entry:
                out[id(p)] = entry
        return out

    def _gather_state(self, param, local: dict, a: int, b: int) -> Optional[dict]:
        """Whole-parameter state from every DP rank's slice [a, b) (sum of zero-padded parts)."""
        group = self.parts[0].data_parallel_group
        have = torch.tensor([1.0 if local else 0.0, float(local["step"]) if local else 0.0],
                            device=param.device)
        dist.all_reduce(have, op=dist.ReduceOp.MAX, group=group)
        any_state, step = have.tolist()
        if not any_state:
            return None
        moments = torch.zeros(2, param.numel(), dtype=torch.float32, device=param.device)
        if local and b > a:
            moments[0, a:b] = local["exp_avg"].view(-1)
            moments[1, a:b] = local["exp_avg_sq"].view(-1)
        dist.all_reduce(moments, group=group)
        return {"step": torch.tensor(step, dtype=torch.float32),  # the same on every shard
                "exp_avg": moments[0].view(param.shape), "exp_avg_sq": moments[1].view(param.shape)}

    def load_full_param_states(self, states: Dict[int, dict]) -> None:
        """Install whole-parameter states (id(param) -> entry), keeping this rank's slice."""
        for param, inner, key, a, b in self._shards():
            entry = states.get(id(param))
            if entry is None:
                continue
            set_adam_state(inner, key, entry["step"], {
                name: entry[name].reshape(-1)[a:b].to(key.device, torch.float32).clone().view(key.shape)
                for name in ("exp_avg", "exp_avg_sq")})


def _keeps_step_per_param(inner) -> bool:
    """torch's Adam/AdamW keep ``step`` in each parameter's state; the fused Adams megatron-core
    picks when Transformer Engine or Apex is installed keep one ``step`` per param group."""
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))


def _group_of(inner, key) -> dict:
    for group in inner.param_groups:
        if any(q is key for q in group["params"]):
            return group
    raise KeyError("parameter is not in this optimizer")


def adam_state(inner, key) -> dict:
    """{'step', 'exp_avg', 'exp_avg_sq'} of ``key`` in ``inner`` ({} before the first step),
    wherever the optimizer keeps its step counter."""
    local = inner.state.get(key, {})
    if "exp_avg" not in local:
        return {}
    step = local["step"] if "step" in local else _group_of(inner, key).get("step", 0)
    return {"step": torch.as_tensor(float(step), dtype=torch.float32),
            "exp_avg": local["exp_avg"], "exp_avg_sq": local["exp_avg_sq"]}


def set_adam_state(inner, key, step, moments: Dict[str, torch.Tensor]) -> None:
    """Install AdamW moments and step for ``key`` in ``inner`` (see adam_state)."""
    state = dict(inner.state.get(key, {}))
    state.update(moments)
    step = torch.as_tensor(step, dtype=torch.float32).clone().cpu()
    if _keeps_step_per_param(inner):
        state["step"] = step
    else:
        group = _group_of(inner, key)
        old = group.get("step")
        group["step"] = step.to(old.device, old.dtype) if torch.is_tensor(old) else int(step.item())
    inner.state[key] = state


def check_supported(chunks, ctx, train_cfg) -> None:
    """Clear errors for what megatron-core's optimizer path does not take."""
    if ctx.device.type != "cuda":
        raise ConfigError("--optimizer-backend megatron (and --use-distributed-optimizer) needs "
                          "CUDA: megatron-core's optimizer allocates on the GPU; use "
                          "--optimizer-backend torch on CPU")
    dtypes = {p.dtype for m in chunks for p in m.parameters()}
    if dtypes != {torch.float32}:
        raise ConfigError(f"--optimizer-backend megatron trains float32 parameters (--bf16 is "
                          f"autocast over them); this model has {sorted(map(str, dtypes))}")
