"""Per-period look at an encoded stream: rows, label rate, share of ids never seen before."""

from __future__ import annotations

from typing import Any

import torch

from reloop.data.periods import phase_of
from reloop.data.tensors import Stream


def inspect_stream(stream: Stream, protocol) -> list[dict[str, Any]]:
    cats = [f.name for f in stream.feature_map.fields if f.kind == "categorical"]
    seen: dict[str, torch.Tensor] = {n: torch.zeros(0, dtype=torch.int64) for n in cats}
    out = []
    for i in range(1, stream.n_periods + 1):
        rows = stream.period(i)
        entry: dict[str, Any] = {
            "period": i,
            "phase": phase_of(i, protocol.pretrain, protocol.warmup, protocol.valid),
            "rows": len(rows),
            "label_rate": float(rows.data["label"].mean()),
        }
        for n in cats:
            ids = rows.data[n]
            entry[f"new {n}"] = float((~torch.isin(ids, seen[n])).float().mean())
            seen[n] = torch.unique(torch.cat([seen[n], ids]))
        out.append(entry)
    return out
