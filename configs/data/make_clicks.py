"""Writes ``configs/data/clicks.csv``, the click log ``configs/csv_example.yaml`` runs on (shipped; rerun to
rebuild it byte for byte): 7,750 impressions over 31 days from reloop's synthetic drifting stream
(``reloop.data.sources.synthetic``), with a ``device`` column added and the true click probability dropped.

    python configs/data/make_clicks.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from reloop.data.sources import load_source

ROWS_PER_DAY = 250
DAYS = 31


def make_clicks() -> pl.DataFrame:
    log = load_source(
        {
            "source": "synthetic",
            "synthetic": {"users": 400, "items": 200, "rows_per_period": ROWS_PER_DAY, "periods": DAYS, "seed": 7},
        }
    )
    frame = log.frame
    rng = np.random.default_rng(7)
    device = rng.choice(["ios", "android", "web"], frame.height, p=[0.4, 0.4, 0.2])
    return pl.DataFrame(
        {
            "ts": frame["time"],
            "label": frame["label"],
            "user_id": frame["user_id"],
            "item_id": frame["item_id"],
            "item_cat": frame["item_cat"],
            "device": device,
            "hour": frame["hour"],
        }
    )


if __name__ == "__main__":
    out = Path(__file__).with_name("clicks.csv")
    make_clicks().write_csv(out)
    print(f"wrote {out}")
