"""Exact (kNN) error memory: a ring buffer of the last M samples, cosine top-k retrieval.

The paper's ANN alternative (ReLoop2, KDD 2023, §3.2.2; METHODS-notes §1.5), searched exactly: the
neighbours of ``h_q`` are the k filled slots with the largest ``cos(h_q, h_i)`` and ``s_i`` is that
cosine. Useful as the reference the sketch approximates and for small streams.

Decay ρ < 1 weights retrieval by age: a sample written t write-batches ago enters the softmax with
weight ρ^t (``log w_i = t·log ρ``), the same weight the sketch gives it, so the two memories agree
when every sample is retrieved (k = M). Selection of the top-k is by cosine alone; the buffer
itself already forgets everything older than M samples.
"""

from __future__ import annotations

import math
from typing import Any, Unpack

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import Tensor

from reloop.memory.base import MEMORIES, ErrorMemory, ErrorMemoryOptions, StateValue
from reloop.registry import Strict


@MEMORIES.register("exact")
class ExactMemory(ErrorMemory):
    """Ring buffer of ``size`` samples (preallocated) with cosine top-``top_k`` retrieval.

    Args:
        dim: key width d.
        size: M, the number of most recent stored samples kept (older ones are overwritten).
        top_k: k neighbours per query; must be <= M. Fewer filled slots give invalid neighbours.
        seed: accepted for a uniform constructor; retrieval is deterministic.
        **kwargs: ``temperature``, ``gamma``, ``write_policy``, ``error_threshold``, ``decay``,
            ``device`` (see ``ErrorMemory``).
    """

    class Options(Strict):
        """``memory: {exact: {...}}``: ring buffer of the last ``size`` samples, cosine top-``top_k``."""

        search_space = {"top_k": [16, 64]}
        size: int = Field(default=10000, ge=1)
        top_k: int = Field(default=64, ge=1)

        @field_validator("top_k")
        @classmethod
        def _top_k_fits(cls, v: int, info: ValidationInfo) -> int:
            size = info.data.get("size")
            if size is not None and v > size:
                raise ValueError(f"must be <= size ({size}), got {v}")
            return v

    def __init__(
        self, dim: int, size: int = 10000, top_k: int = 64, seed: int = 0, **kwargs: Unpack[ErrorMemoryOptions]
    ) -> None:
        super().__init__(dim, **kwargs)
        if int(size) < 1:
            raise ValueError(f"size: must be >= 1, got {size}")
        if not 1 <= int(top_k) <= int(size):
            raise ValueError(f"top_k: must be in [1, size={size}], got {top_k}")
        self.size, self.top_k = int(size), int(top_k)
        M, dev = self.size, self.device
        # Keys are stored unit-normalised so a read is one matmul, not a norm per stored sample.
        self.keys = torch.zeros((M, self.dim), dtype=torch.float32, device=dev)
        self.labels = torch.zeros(M, dtype=torch.float32, device=dev)
        self.base = torch.zeros(M, dtype=torch.float32, device=dev)
        self.stamp = torch.zeros(M, dtype=torch.int64, device=dev)  # write tick, for decay
        self._ptr = 0  # next slot to overwrite (the oldest once the buffer is full)
        self._filled = 0
        # Bounds the [rows, M] similarity block of a read to about 4 MB.
        self._block_rows = max(16, min(4096, (1 << 20) // M))

    @property
    def filled(self) -> int:
        """Number of occupied slots (at most ``size``)."""
        return self._filled

    def _store(self, h: Tensor, y: Tensor, y_hat: Tensor) -> None:
        M = self.size
        n_all = h.shape[0]
        # Only the last M of an oversized batch would survive anyway.
        h, y, y_hat = h[-M:], y[-M:], y_hat[-M:]
        n = h.shape[0]
        slots = (self._ptr + torch.arange(n, device=self.device)) % M
        self.keys[slots] = torch.nn.functional.normalize(h, dim=1, eps=1e-12)
        self.labels[slots] = y.to(torch.float32)
        self.base[slots] = y_hat.to(torch.float32)
        self.stamp[slots] = self._tick
        self._ptr = (self._ptr + n) % M
        self._filled = min(M, self._filled + n_all)

    def _retrieve(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        B, k, f = h.shape[0], self.top_k, self._filled
        s = torch.zeros((B, k), dtype=torch.float32, device=self.device)
        y, y_base = torch.zeros_like(s), torch.zeros_like(s)
        valid = torch.zeros((B, k), dtype=torch.bool, device=self.device)
        log_w = torch.zeros((B, k), dtype=torch.float64, device=self.device) if self.decay < 1 else None
        if f == 0:
            return s, y, y_base, valid, log_w
        kk = min(k, f)
        q = torch.nn.functional.normalize(h, dim=1, eps=1e-12)
        # Until the first wrap the filled slots are exactly the prefix [0, f): a view, no copy.
        sim = q @ self.keys[:f].T
        top, idx = sim.topk(kk, dim=1, sorted=False)
        s[:, :kk] = top
        y[:, :kk] = self.labels[idx]
        y_base[:, :kk] = self.base[idx]
        valid[:, :kk] = True
        if log_w is not None:
            log_w[:, :kk] = (self._tick - self.stamp[idx]).to(torch.float64) * math.log(self.decay)
        return s, y, y_base, valid, log_w

    def _clear(self) -> None:
        for t in self._tensors().values():
            t.zero_()
        self._ptr = 0
        self._filled = 0

    def _config(self) -> dict[str, StateValue]:
        return {"size": self.size, "top_k": self.top_k}

    def _tensors(self) -> dict[str, Tensor]:
        return {"keys": self.keys, "labels": self.labels, "base": self.base, "stamp": self.stamp}

    def _scalars(self) -> dict[str, int | float]:
        return {**super()._scalars(), "ptr": self._ptr, "filled": self._filled}

    def _check_fixed(self, state: dict[str, Any]) -> None:
        ptr, filled = int(state["ptr"]), int(state["filled"])
        # Retrieval relies on the filled slots being the prefix [0, filled) until the first wrap.
        if not (0 <= filled <= self.size and 0 <= ptr < self.size and (filled == self.size or ptr == filled)):
            raise ValueError(
                f"ExactMemory.load_state_dict: ptr/filled inconsistent for size {self.size}: ptr={ptr}, filled={filled}"
            )

    def _set_scalars(self, state: dict[str, Any]) -> None:
        super()._set_scalars(state)
        self._ptr = int(state["ptr"])
        self._filled = int(state["filled"])
