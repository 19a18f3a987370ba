"""Random streams: each call that runs a tenant's code draws from an RNG state of its own.

Note [Random streams]
    Hugging Face `generate` samples with `torch.multinomial` on torch's global generators, and dropout
    and the graph path's random ops draw from them too. Those generators are one per process, shared by
    every tenant, so no tenant code runs on the engine's own state. Every call (a generate's task, a
    breakpoint run, a forward, a graph) gets a `Stream` when it arrives:
    - with a seed, the state `torch.manual_seed(seed)` leaves, so it draws bitwise what the same call
      draws locally after `torch.manual_seed(seed)`;
    - without one, a state seeded from the OS's entropy (`secrets`), so two unseeded calls differ and
      nothing that ran before, of this tenant or another, decides what it draws. (torch seeds its CPU
      generator with the low 32 bits of a seed; the CUDA one takes all 64.)
    `Stream.active()` puts the call's state into the global generators around each stretch of the
    call's execution (a task's step, a run's stretch up to its next stop), keeps what that stretch
    left, and puts back what was there. So a call's draws depend on its seed and its own earlier draws
    only: no other call that runs, seeds or samples between its steps changes them, and its seed
    changes no one else's. The swap is safe across threads because only one thread runs at a time
    (Notes [Step hand-off] and [Run hand-off]); it costs about 10 us per stretch on the CPU.
"""
from __future__ import annotations

import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass
class Stream:
    """The state of torch's global generators as one call sees them: the CPU's and, on a CUDA server,
    its device's (the one device this server uses)."""

    device: torch.device
    cpu: torch.Tensor
    cuda: torch.Tensor | None

    @classmethod
    def new(cls, seed: int | None, device: torch.device) -> "Stream":
        """Seeded: the state `torch.manual_seed(seed)` leaves, bitwise. None: fresh entropy from the OS."""
        if seed is None:
            seed = secrets.randbits(64)
        # A private generator seeded alike has the default generator's state after manual_seed (same
        # state format), and building it this way touches no global state.
        cpu = torch.Generator().manual_seed(seed).get_state()
        cuda = torch.Generator(device).manual_seed(seed).get_state() if device.type == "cuda" else None
        return cls(device, cpu, cuda)

    @classmethod
    def current(cls, device: torch.device) -> "Stream":
        """What torch's global generators hold now: inside a call's `active()` block, the call's stream
        at this point (a breakpoint run marks each step's, for forks that start at that step)."""
        return cls(device, *_get(device))

    def copy(self) -> "Stream":
        """An independent stream at the same point (a fork replays its parent's draws from its start)."""
        return Stream(self.device, self.cpu.clone(), None if self.cuda is None else self.cuda.clone())

    @contextmanager
    def active(self) -> Iterator[None]:
        """Inside the block torch's global generators hold this stream; after it, the stream holds what the
        block left them in, and they hold what they held before."""
        saved = _get(self.device)
        _set(self.device, self.cpu, self.cuda)
        try:
            yield
        finally:
            self.cpu, self.cuda = _get(self.device)
            _set(self.device, *saved)


def _get(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set(device: torch.device, cpu: torch.Tensor, cuda: torch.Tensor | None) -> None:
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
