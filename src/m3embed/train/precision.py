"""Mixed precision and non-finite steps: what dtype the encoder runs in, the fp16 loss scaler, and the
guard that never lets a non-finite step reach the weights.

Per step (:meth:`StepGuard.decide`, after the gradients are summed over ranks):

1. under fp16 the gradients are unscaled once (``GradScaler.unscale_``), before clipping;
2. a step whose loss (any part) or gradient norm is not finite on any rank is skipped on every rank
   (one all-reduced flag): no optimizer step, no scheduler step; the batch is consumed all the same;
3. under fp16 the scaler backs its scale off after a skipped step and grows it after
   ``growth_interval`` good ones (``GradScaler.update``) — the scaler's own skip is this skip;
4. ``max_skipped_steps`` skipped steps in a row stop the run (:class:`NonFiniteStop`, exit code 1),
   naming the step, the parts that were not finite and the last checkpoint, which is known good:
   :func:`check_finite_weights` refuses to write a checkpoint with a non-finite weight, and stops the
   run at once when an applied update (finite gradients, a learning rate far too high) overflowed one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from m3embed import checkpoint as ckpt
from m3embed import distributed
from m3embed.train.config import TrainConfig

logger = logging.getLogger(__name__)


class NonFiniteStop(RuntimeError):
    """Training stopped because its steps are not finite; the message says where and what is kept."""


def autocast_dtype(tc: TrainConfig) -> torch.dtype | None:
    """The encoder's autocast dtype (scores and the loss stay fp32): fp16, bf16 or none (fp32)."""
    return torch.float16 if tc.fp16 else torch.bfloat16 if tc.bf16 else None


@dataclass
class StepGuard:
    """Decides, the same way on every rank, whether a step's update is applied; counts the skipped."""

    max_skipped_steps: int
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    skipped_steps: int = 0  # in the whole run
    skipped_in_a_row: int = 0
    last_problem: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_run(cls, tc: TrainConfig, device: torch.device) -> StepGuard:
        scaler = torch.amp.GradScaler(device.type, init_scale=tc.fp16_init_scale) if tc.fp16 else None
        return cls(tc.max_skipped_steps, scaler)

    @property
    def loss_scale(self) -> float | None:
        return float(self.scaler.get_scale()) if self.scaler is not None else None

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the (rank-summed) gradients by the loss scale, once, before they are clipped."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def decide(
        self, parts: dict[str, float], grad_norm: float, step: int, info: distributed.DistInfo
    ) -> bool:
        """True: apply this step's update. False: skip it (counted, warned about once). Raises
        :class:`NonFiniteStop` when ``max_skipped_steps`` steps in a row were skipped."""
        bad_parts = sorted(name for name, value in parts.items() if not math.isfinite(value))
        bad_here = bool(bad_parts) or not math.isfinite(grad_norm)
        if not distributed.any_rank(bad_here, info):
            self.skipped_in_a_row = 0
            return True
        self.skipped_steps += 1
        self.skipped_in_a_row += 1
        self.last_problem = {"step": step, "parts": bad_parts, "grad_norm": grad_norm}
        if self.skipped_steps == 1:
            logger.warning(
                "step %d is not finite (%s); it was skipped: no optimizer or scheduler step%s. Further "
                "skipped steps are counted in skipped_steps (train_log.jsonl) without a warning",
                step,
                _what(bad_parts, grad_norm, bad_here),
                "; the loss scale backs off" if self.scaler is not None else "",
            )
        return False

    def after_step(self, applied: bool, output_dir: str) -> None:
        """Update the loss scale (backed off after a skip); stop after too many skips in a row."""
        if self.scaler is not None:
            if applied or _found_inf(self.scaler):
                self.scaler.update()
            else:  # skipped for a non-finite loss while the gradients were finite: back off all the same
                self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
        if self.skipped_in_a_row >= self.max_skipped_steps:
            raise NonFiniteStop(self.stop_message(output_dir))

    def stop_message(self, output_dir: str, why: str | None = None) -> str:
        p = self.last_problem
        why = why or (
            f"{self.skipped_in_a_row} steps in a row were not finite (train.max_skipped_steps = "
            f"{self.max_skipped_steps}); the last, step {p['step']}: {_what(p['parts'], p['grad_norm'], True)}"
        )
        return (
            f"training stopped: {why}. The last checkpoint, {_last_checkpoint(output_dir)}, is known good "
            "(no checkpoint is written with non-finite weights); lower --learning-rate or --max-grad-norm, "
            "or use --bf16 or fp32 instead of --fp16, and --resume from it"
        )

    def state_dict(self) -> dict[str, Any]:
        scaler = self.scaler.state_dict() if self.scaler is not None else None
        return {
            "scaler": scaler,
            "skipped_steps": self.skipped_steps,
            "skipped_in_a_row": self.skipped_in_a_row,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = state["skipped_steps"]
        self.skipped_in_a_row = state["skipped_in_a_row"]
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def check_finite_weights(
    model: torch.nn.Module, guard: StepGuard, step: int, output_dir: str, doing: str
) -> None:
    """Raise :class:`NonFiniteStop` if a parameter is not finite. ``doing`` says what found it: an
    update with finite gradients can still overflow the weights (a learning rate far too high)."""
    named = list(model.named_parameters())
    finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named])  # one sync, not one a tensor
    if not bool(finite.all()):
        bad = [name for (name, _), ok in zip(named, finite.tolist()) if not ok]
        names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteStop(
            guard.stop_message(output_dir, f"{doing} at step {step}: weights not finite ({names})")
        )


def _what(bad_parts: list[str], grad_norm: float, bad: bool) -> str:
    loss = f"loss parts {', '.join(bad_parts)} not finite" if bad_parts else "loss finite"
    return f"{loss}, gradient norm {grad_norm:g}" if bad else "finite"


def _found_inf(scaler: torch.amp.GradScaler) -> bool:
    states = scaler._per_optimizer_states.values()  # what unscale_ recorded for each optimizer
    return any(float(v) > 0 for s in states for v in s.get("found_inf_per_device", {}).values())


def _last_checkpoint(output_dir: str) -> str:
    found = ckpt.list_checkpoints(Path(output_dir))
    return str(found[-1]) if found else "none yet (the run saved none; it started from its --model)"
