"""LSH sketch error memory (ReLoop2, KDD 2023, §2.3 and §3.2.2; METHODS-notes §1.5).

K independent arrays, each with its own L SimHash planes ``w ~ N(0, I)``; the bucket of ``h`` in
array k packs the bits ``[w_{k,l}·h > 0]`` into ``b_k(h) = Σ_l 2^l·bit_l ∈ [0, 2^L)``. Every bucket
accumulates a count n, Σy and Σŷ (the paper's 2^L × K × 3 sketch); with ``similarity="centroid"``
also Σh. A read takes, in each array, the query's bucket as one neighbour::

    y_k = Σy / n,   ŷ_k = Σŷ / n,
    s_k = n / N                       (density, option A: a RACE kernel-density estimate)
    s_k = cos(h_q, Σh / n)            (centroid, option B, ours: costs d more floats per bucket)

so K plays the role of top-k; empty buckets are masked. ``N`` is the total (decayed) weight written.
Decay ρ multiplies every accumulator by ρ before each write batch, so a sample written t batches ago
weighs ρ^t in both the bucket means and the densities.

Writes and reads cost O(K·L·d) per sample, vectorised over samples and arrays: one matmul for all
K·L projections, one batched matvec to pack the bits, then ``index_add_`` / ``index_select`` on the
flattened ``[K·2^L]`` bucket axis. Python loops only walk cache-sized blocks: rows (so the
``[K·L, rows]`` projections stay in cache) and, for large 2^L, groups of arrays on writes (so the
random updates of a group land in cache). The projection matmul dominates the cost (K·L·d
multiply-adds per sample); ``hash_dtype=torch.bfloat16`` roughly halves it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal, Self, Unpack

import torch
from pydantic import Field
from torch import Tensor

from reloop.memory.base import MEMORIES, ErrorMemory, ErrorMemoryOptions, StateValue
from reloop.registry import Strict

SIMILARITIES = ("density", "centroid")
MAX_BITS = 24  # bucket ids are packed in float32, exact below 2^24; also a sanity bound on size
# Bound on per-chunk temporaries (K·L or K·d floats per row). A read is ~15 small ops per chunk: at
# 2^18 (512 rows for K=64 L=8) their dispatch cost was about a fifth of the read (benchmarks/memory.py).
_CHUNK_ELEMS = 1 << 20
_GROUP_BYTES = 1 << 19  # accumulator bytes of the arrays scattered together (about L2-sized)


@MEMORIES.register("sketch")
class SketchMemory(ErrorMemory):
    """ReLoop2's LSH sketch: ``arrays`` × ``2^bits`` buckets of (n, Σy, Σŷ[, Σh]).

    Args:
        dim: key width d.
        arrays: K, the number of hash arrays (= neighbours per query). Paper: 70 to 180.
        bits: L, SimHash bits per array; 0 gives one bucket per array (global statistics).
        similarity: ``"density"`` (default) or ``"centroid"``; see the module docstring.
        seed: seeds the planes through a private ``torch.Generator``; the global RNG is untouched.
        accum_dtype: dtype of n, Σy, Σŷ. float64 by default so counts stay exact past 2^24 writes.
        hash_dtype: dtype of the projection matmul. ``torch.bfloat16`` roughly halves the cost of
            hashing (the dominant cost) on CPUs with bf16 dot products; it hashes the inputs rounded
            to bf16, a slightly different but equally valid SimHash (about 0.1% of bits differ
            from float32). float32 by default.
        **kwargs: ``temperature``, ``gamma``, ``write_policy``, ``error_threshold``, ``decay``,
            ``device`` (see ``ErrorMemory``).
    """

    class Options(Strict):
        """``memory: {sketch: {...}}``: K arrays of 2^L buckets (paper: K = 70 to 180)."""

        #: tuned on the valid periods by ``reloop tune``; paper: K = 70-180, L up to 10
        search_space = {"bits": [6, 8, 10]}
        arrays: int = Field(default=64, ge=1)
        bits: int = Field(default=8, ge=0, le=MAX_BITS)
        similarity: Literal["density", "centroid"] = "density"
        hash_dtype: Literal["float32", "bfloat16"] = "float32"  # ours: bfloat16 hashes ~2x faster
        project: int | None = Field(default=None, ge=1)  # ours: hash a fixed random projection to this width

    @classmethod
    def from_options(cls, options: Strict, dim: int, seed: int = 0, **common: Unpack[ErrorMemoryOptions]) -> Self:
        assert isinstance(options, SketchMemory.Options)
        return cls(
            dim,
            arrays=options.arrays,
            bits=options.bits,
            similarity=options.similarity,
            seed=seed,
            hash_dtype=getattr(torch, options.hash_dtype),
            project=options.project,
            **common,
        )

    def __init__(
        self,
        dim: int,
        arrays: int = 64,
        bits: int = 8,
        similarity: str = "density",
        seed: int = 0,
        *,
        accum_dtype: torch.dtype = torch.float64,
        hash_dtype: torch.dtype = torch.float32,
        project: int | None = None,
        **kwargs: Unpack[ErrorMemoryOptions],
    ) -> None:
        super().__init__(dim, **kwargs)
        if int(arrays) < 1:
            raise ValueError(f"arrays: must be >= 1, got {arrays}")
        if not 0 <= int(bits) <= MAX_BITS:
            raise ValueError(f"bits: must be in [0, {MAX_BITS}], got {bits}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity: must be one of {SIMILARITIES}, got {similarity!r}")
        if accum_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"accum_dtype: must be torch.float32 or torch.float64, got {accum_dtype}")
        if hash_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"hash_dtype: must be torch.float32 or torch.bfloat16, got {hash_dtype}")
        if project is not None and int(project) < 1:
            raise ValueError(f"project: must be >= 1, got {project}")
        self.arrays, self.bits = int(arrays), int(bits)
        self.similarity, self.seed = similarity, int(seed)
        self.accum_dtype, self.hash_dtype = accum_dtype, hash_dtype
        # Keys wider than `project` are first mapped by one fixed Gaussian matrix R [dim, m]
        # (Johnson-Lindenstrauss: angles are kept approximately), so hashing costs dim·m + K·L·m
        # multiply-adds per row instead of K·L·dim.
        self.project = int(project) if project is not None and int(project) < self.dim else None
        K, L, nb = self.arrays, self.bits, 1 << self.bits
        d = self.project or self.dim
        gen = torch.Generator().manual_seed(self.seed)
        # Drawn on CPU so a seed gives the same planes on every device.
        self.planes = torch.randn((K, L, d), generator=gen).to(self.device)
        self.proj = (torch.randn((self.dim, d), generator=gen) / d**0.5).to(self.device) if self.project else None
        # A view in float32 (tests may set planes in place); a bfloat16 copy otherwise.
        self._planes_flat = self.planes.view(K * L, d).to(hash_dtype)
        pow2 = 2.0 ** torch.arange(L, dtype=torch.float32, device=self.device)
        self._pow2 = pow2.expand(K, 1, L).contiguous()
        self._offsets = (torch.arange(K, device=self.device) << L).view(K, 1)
        exact = K * nb <= 1 << MAX_BITS
        self._fused_offsets = self._offsets.view(K, 1, 1).float() if exact else None
        # Rows n, Σy, Σŷ over the flattened (array, bucket) axis: one index_add_ covers all three.
        self.acc = torch.zeros((3, K * nb), dtype=accum_dtype, device=self.device)
        self.hsum = (
            torch.zeros((K * nb, d), dtype=torch.float32, device=self.device) if similarity == "centroid" else None
        )
        self._mass = 0.0
        width = max(L, 3, d if self.hsum is not None else 0)
        self._chunk = max(64, _CHUNK_ELEMS // (K * width))
        self._block_rows = self._chunk
        bucket_bytes = 3 * self.acc.element_size() + (4 * d if self.hsum is not None else 0)
        self._group = max(1, _GROUP_BYTES // (nb * bucket_bytes))
        # Rows per write block: bounds the [K, rows] indices and the expanded scatter sources.
        g = min(K, self._group)
        per_row = max(K, 3 * g) + (g * d if self.hsum is not None else 0)
        self._write_rows = max(self._chunk, (1 << 21) // per_row)

    # ------------------------------------------------------------------ hashing
    def flat_buckets(self, h: Tensor) -> Tensor:
        """Indices ``[K, n]`` into the flattened ``[K·2^L]`` bucket axis for float32 keys ``[n, d]``.

        int32 while every index is exact in float32 (``K·2^L <= 2^24``, every practical sketch):
        the array offsets are then added inside the bit-packing matmul and the ids converted once;
        int64 otherwise, and for ``bits = 0`` (the offsets themselves).
        """
        n = h.shape[0]
        if self.bits == 0:
            return self._offsets.expand(self.arrays, n).clone()
        # [K·L, n]: all projections of the chunk in one matmul.
        proj = self._planes_flat @ h.T.to(self.hash_dtype)
        proj.gt_(0)  # in place: the bits as 0/1 floats, no bool temporary
        if proj.dtype != torch.float32:
            proj = proj.float()  # bfloat16 cannot hold bucket ids above 256 exactly
        bits = proj.view(self.arrays, self.bits, n)
        if self._fused_offsets is not None:
            # offset_k + Σ_l 2^l·bit_l in one batched matmul: [K, 1, 1] + [K, 1, L] @ [K, L, n]
            return torch.baddbmm(self._fused_offsets, self._pow2, bits).view(self.arrays, n).to(torch.int32)
        packed = torch.bmm(self._pow2, bits).view(self.arrays, n)
        return packed.long() + self._offsets

    def _projected(self, h: Tensor) -> Tensor:
        return h @ self.proj if self.proj is not None else h

    def buckets(self, h: Tensor) -> Tensor:
        """Bucket id ``[B, K]`` in ``[0, 2^L)`` of each key in each array (for inspection/tests)."""
        h = self._projected(self._centred(self._check_h(h)))
        return (self.flat_buckets(h).long() - self._offsets).T.contiguous()

    def _row_chunks(self, n: int) -> Iterator[tuple[int, int]]:
        for start in range(0, n, self._chunk):
            yield start, min(n, start + self._chunk)

    # ------------------------------------------------------------------ ErrorMemory hooks
    def _on_tick(self) -> None:
        self.acc.mul_(self.decay)
        if self.hsum is not None:
            self.hsum.mul_(self.decay)
        self._mass *= self.decay

    def _store(self, h: Tensor, y: Tensor, y_hat: Tensor) -> None:
        h = self._projected(h)
        vals = torch.stack([torch.ones_like(y), y, y_hat]).to(self.accum_dtype)  # rows n, Σy, Σŷ
        for a in range(0, h.shape[0], self._write_rows):
            self._store_block(h[a : a + self._write_rows], vals[:, a : a + self._write_rows])
        self._mass += float(h.shape[0])

    def _store_block(self, h: Tensor, vals: Tensor) -> None:
        n = h.shape[0]
        # int64: index_add_ takes a slow path (~25x) with int32 indices on CPU
        idx = torch.empty((self.arrays, n), dtype=torch.int64, device=self.device)
        for a, b in self._row_chunks(n):
            idx[:, a:b] = self.flat_buckets(h[a:b])
        # Scatter the whole block one group of arrays at a time: a group's buckets fit in cache,
        # so its n random updates hit cache instead of sweeping the whole sketch per row chunk.
        for k0 in range(0, self.arrays, self._group):
            g = min(self.arrays, k0 + self._group) - k0
            ii = idx[k0 : k0 + g].view(-1)
            self.acc.index_add_(1, ii, vals.unsqueeze(1).expand(3, g, n).reshape(3, -1))
            if self.hsum is not None:
                self.hsum.index_add_(0, ii, h.unsqueeze(0).expand(g, n, h.shape[1]).reshape(-1, h.shape[1]))

    def _retrieve(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, None]:
        h = self._projected(h)
        B, K = h.shape[0], self.arrays
        got = torch.empty((3, B, K), dtype=self.accum_dtype, device=self.device)
        s = torch.empty((B, K), dtype=self.accum_dtype, device=self.device)
        for a, b in self._row_chunks(B):
            # Query-major indices so the gathered rows land directly in the [B, K] layout.
            idx = self.flat_buckets(h[a:b]).T.contiguous().view(-1)
            for j in range(3):  # three 1-D gathers are ~3x faster than one strided 2-D gather
                torch.index_select(self.acc[j], 0, idx, out=got[j, a:b].view(-1))
            if self.hsum is not None:
                cen = self.hsum.index_select(0, idx).view(b - a, K, h.shape[1])
                s[a:b] = torch.nn.functional.cosine_similarity(cen, h[a:b].unsqueeze(1), dim=-1, eps=1e-12)
        cnt = got[0]
        valid = cnt > 0
        # Empty buckets divide 0 by `tiny`: 0, and they are masked anyway.
        means = got[1:].div_(cnt.clamp_min(torch.finfo(self.accum_dtype).tiny))
        if self.hsum is None:
            torch.mul(cnt, 1.0 / self._mass if self._mass > 0 else 0.0, out=s)
        return s, means[0], means[1], valid, None

    def _estimate_block(self, h: Tensor, y_q: Tensor) -> tuple[Tensor, Tensor]:
        """``ErrorMemory.estimate`` for one row block, fused for the density similarity.

        The attention over the valid neighbours, ``a_k ∝ exp(s_k / τ)`` with ``s_k = n_k / N``, is
        computed as ``w_k = exp((n_k - max_j n_j) / (N·τ))`` over all K arrays in ``[K, rows]``
        layout (no transposes); an empty bucket has ``n_k = 0``, hence ``Σy_k = 0`` and the same
        weight ``exp(-max_j n_j / (N·τ))``, so it drops out of the numerator by itself and is
        subtracted from the denominator in closed form (the maximum is a valid bucket's, so the
        denominator stays >= 1). Equal to the generic masked softmax up to float rounding (tested).
        With the larger row chunks: 0.69M -> 1.32M reads/s at K=64 L=8 d=64 on 2 cores
        (``benchmarks/memory.py``, docs/performance.md).
        """
        if self.hsum is not None or self._mass <= 0:
            return super()._estimate_block(h, y_q)
        h = self._projected(h)
        K, n = self.arrays, h.shape[0]
        idx = self.flat_buckets(h).view(-1)
        cnt = self.acc[0].index_select(0, idx).view(K, n)
        y_sum = self.acc[1].index_select(0, idx).view(K, n)
        c = 1.0 / (self._mass * self.temperature)
        top = cnt.amax(0)
        w = torch.sub(cnt, top).mul_(c).exp_()
        support = torch.count_nonzero(cnt, dim=0)
        den = w.sum(0).sub_((K - support) * torch.exp(top * -c))
        cnt.add_(torch.finfo(cnt.dtype).tiny)  # 0 / tiny = 0 for empty buckets; others unchanged
        y_bar = torch.mul(w, y_sum.div_(cnt)).sum(0).div_(den)
        if self.gamma == 1.0:
            e_hat = y_bar - y_q
        else:
            y_base = self.acc[2].index_select(0, idx).view(K, n).div_(cnt)
            y_bar_base = torch.mul(w, y_base).sum(0).div_(den)
            e_hat = self.gamma * (y_bar - y_q) + (1.0 - self.gamma) * (y_bar - y_bar_base)
        return e_hat.masked_fill_(support == 0, 0.0), support

    def _clear(self) -> None:
        self.acc.zero_()
        if self.hsum is not None:
            self.hsum.zero_()
        self._mass = 0.0

    def _config(self) -> dict[str, StateValue]:
        return {
            "arrays": self.arrays,
            "bits": self.bits,
            "similarity": self.similarity,
            "seed": self.seed,
            "accum_dtype": str(self.accum_dtype),
            "hash_dtype": str(self.hash_dtype),
            "project": self.project or 0,
        }

    def _tensors(self) -> dict[str, Tensor]:
        out = {"planes": self.planes, "acc": self.acc}
        if self.proj is not None:
            out["proj"] = self.proj
        if self.hsum is not None:
            out["hsum"] = self.hsum
        return out

    def _scalars(self) -> dict[str, int | float]:
        return {**super()._scalars(), "mass": self._mass}

    def _set_scalars(self, state: dict[str, Any]) -> None:
        super()._set_scalars(state)
        self._mass = float(state["mass"])

    def _check_fixed(self, state: dict[str, Any]) -> None:
        if not torch.equal(state["planes"].to(self.planes.device), self.planes):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: planes: the hash planes differ "
                "although the seed matches (another torch RNG?); buckets would not match"
            )
