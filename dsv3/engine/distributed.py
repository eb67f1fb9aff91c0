"""The engine under torchrun: rank 0 drives, every rank runs the model.

With a model split over several ranks (`dsv3.model.parallel`), one `LLM` exists on every rank, but only rank 0
(the driver) schedules, samples and talks to the user (the CLI, the HTTP server, the chat page). For each step
the driver broadcasts the step's plan (`StepPlan`: per scheduled sequence its new tokens, first position, block
table and whether it samples) over the context's gloo control group, then runs the step itself; every other rank
(`follow`) receives the plan and runs the same forward through its own `ModelRunner` (same cache layout, same
block tables, its CUDA graphs on GPUs), so that the collectives inside the model meet. Sampling happens once, on
the driver: a follower's runner gets `SkipSampling`, which draws nothing.

Messages: `("step", plan)`, `("idle", None)` at the end of a driver's `LLM.generate` (followers that called
`generate` too return then, so one script can run on every rank), and `("stop", None)` from the driver's
`LLM.close()` (followers in `run_worker` return; a follower's own `close()` waits for it). `close()` runs at exit
too, on every rank, in the order the engines were made. Every collective has the context's timeout: a rank that
dies or hangs ends the others with a `RuntimeError` naming the rank, not a silent hang.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dsv3.engine.sampling import SamplerOutput
from dsv3.parallel import ParallelContext


class _NoParams:
    seed = None
    logprobs = None


@dataclass
class PlannedSeq:
    """What a follower needs of one scheduled sequence: its tokens `[start, start + len(tokens))` (drafts
    included) and its block table. Read through the `Sequence` methods the model runner uses."""

    seq_id: int
    start: int
    tokens: list[int]
    block_table: list[int]
    params: Any = field(default_factory=_NoParams)  # followers do not sample
    output_token_ids: list[int] = field(default_factory=list)
    generator: Any = None

    def __getattr__(self, name: str) -> Any:
        """Other `Sequence` fields the runner hands to the sampler (followers do not sample): None."""
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    def token_slice(self, lo: int, hi: int) -> list[int]:
        return self.tokens[lo - self.start: hi - self.start]

    def token_id_at(self, pos: int) -> int:
        return self.tokens[pos - self.start]


@dataclass
class PlannedItem:
    seq: PlannedSeq
    start: int
    num_tokens: int
    sample: bool
    drafts: list[int] = field(default_factory=list)


@dataclass
class StepPlan:
    """One step as followers run it (the `SchedulerOutput` fields the model runner reads)."""

    scheduled: list[PlannedItem]

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @classmethod
    def of(cls, out: Any) -> StepPlan:
        items = []
        for item in out.scheduled:
            seq, drafts = item.seq, list(getattr(item, "drafts", []))
            own = seq.token_slice(item.start, item.start + item.num_tokens - len(drafts))
            planned = PlannedSeq(seq.seq_id, item.start, own + drafts, list(seq.block_table))
            items.append(PlannedItem(planned, item.start, item.num_tokens, item.sample, drafts))
        return cls(items)


class SkipSampling:
    """A follower's sampler: the driver samples; this returns placeholder token ids without looking at logits."""

    def __call__(self, logits: torch.Tensor, *args: Any, **kwargs: Any) -> SamplerOutput:
        return SamplerOutput(token_ids=torch.zeros(logits.shape[0], dtype=torch.long))


def _message(ctx: ParallelContext, msg: tuple[str, Any] | None) -> tuple[str, Any]:
    try:
        return ctx.broadcast_object(msg)
    except Exception as e:  # a dead or stuck peer: one line that says who and why
        who = "a follower rank" if ctx.is_driver else "the driver (rank 0)"
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RuntimeError(f"rank {ctx.rank}: {who} died or stopped answering (collective timeout "
                           f"{ctx.timeout:g}s, DSV3_DIST_TIMEOUT): {detail}") from e


class Link:
    """One engine's side of the conversation: the driver announces, followers run what it announces."""

    def __init__(self, ctx: ParallelContext) -> None:
        self.ctx = ctx
        self.stopped = False

    def step(self, out: Any) -> None:
        """Driver: every rank runs this step's forward."""
        _message(self.ctx, ("step", StepPlan.of(out)))

    def idle(self) -> None:
        """Driver: the end of a `generate` (followers that called `generate` too return)."""
        _message(self.ctx, ("idle", None))

    def follow(self, runner: Any, until: str = "stop") -> None:
        """Follower: run every step the driver announces until `until` ("idle" or "stop"; "stop" ends any loop)."""
        if self.stopped:
            raise RuntimeError(f"rank {self.ctx.rank}: the driver already closed this engine")
        runner.sampler = SkipSampling()
        while True:
            kind, plan = _message(self.ctx, None)
            if kind == "step":
                runner.execute(plan)
            elif kind == "stop":
                self.stopped = True
                return
            elif kind == until:
                return

    def close(self, runner: Any) -> None:
        """Every rank, once: the driver says stop; a follower not yet stopped runs what is left until it does."""
        if self.stopped:
            return
        if self.ctx.is_driver:
            self.stopped = True
            _message(self.ctx, ("stop", None))
        else:
            self.follow(runner, "stop")


def prepare_runner_args(model: Any, fast: bool | None) -> bool | None:
    """`fast` for a split model: the fused MoE stacks every expert of a layer, so expert parallel (ep > 1) runs
    the reference MoE path (fast=None becomes False; fast=True is an error)."""
    ctx: ParallelContext | None = getattr(model, "parallel", None)
    if ctx is None or ctx.ep == 1:
        return fast
    if fast:
        raise ValueError("fast=True (fused MoE) does not run with expert parallel (--ep > 1) yet; use --ep 1")
    return False


def agreed_num_blocks(ctx: ParallelContext, num_blocks: int) -> int:
    """The cache blocks every rank can hold: the smallest over the world (all ranks run the same block tables)."""
    if ctx.world == 1:
        return num_blocks
    t = torch.tensor([num_blocks], dtype=torch.long)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=ctx.control_group)
    return int(t.item())
