"""(b) A model reloop's zoo does not have — a two-tower model — under ASMG and the prequential protocol.

Your model only has to be an ``nn.Module``. ``reloop.MetaGenerator`` (ASMG, Peng et al., RecSys 2021)
generates the serving model from the last k trained models; ``reloop.prequential`` runs the
test-then-train protocol over any object with ``predict`` and ``fit``; ``reloop.summarize`` and
``reloop.plot_periods`` give the same table and figure as ``reloop run``.

Run: ``python examples/custom_model_asmg.py [OUT_DIR]`` (seconds on a CPU; writes periods.png to
OUT_DIR when given).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import reloop

torch.set_num_threads(1)
USERS, ITEMS, CATEGORIES = 200, 100, 10


class TwoTower(nn.Module):
    """User tower · item tower: logit = <u(user, hour), v(item, category)> + b."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.user = nn.Embedding(USERS, dim)
        self.hour = nn.Embedding(24, dim)
        self.item = nn.Embedding(ITEMS, dim)
        self.category = nn.Embedding(CATEGORIES, dim)
        self.user_tower = nn.Sequential(nn.Linear(2 * dim, dim), nn.Tanh())
        self.item_tower = nn.Sequential(nn.Linear(2 * dim, dim), nn.Tanh())
        self.bias = nn.Parameter(torch.zeros(1))
        for table in (self.user, self.hour, self.item, self.category):
            nn.init.normal_(table.weight, std=0.05)

    def forward(
        self, user: torch.Tensor, item: torch.Tensor, category: torch.Tensor, hour: torch.Tensor
    ) -> torch.Tensor:
        u = self.user_tower(torch.cat([self.user(user), self.hour(hour)], dim=1))
        v = self.item_tower(torch.cat([self.item(item), self.category(category)], dim=1))
        return 3.0 * (u * v).sum(-1) + self.bias


class TwoTowerLearner:
    """The adapter ``reloop.prequential`` needs: ``predict(inputs)`` and ``fit(inputs, labels, served)``.

    With a ``MetaGenerator`` it follows ASMG's Algorithm 1: the period just served first trains the
    generator, then the base model (incremental update), which the generator then observes.
    """

    def __init__(self, generator: reloop.MetaGenerator | None = None, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = TwoTower()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.generator = generator
        self.rng = torch.Generator().manual_seed(seed)
        self.epochs = 3  # the first fit is pretraining

    @torch.no_grad()
    def predict(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        serving = self.generator.serving_model() if self.generator and self.generator.n_observed else self.model
        serving.eval()
        return torch.sigmoid(serving(**inputs))

    def fit(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, served: torch.Tensor) -> None:
        if self.generator is not None:
            self.generator.learn({**inputs, "label": labels})  # the served period trains the generator
        self.model.train()
        for _ in range(self.epochs):
            order = torch.randperm(len(labels), generator=self.rng)
            for start in range(0, len(labels), 256):
                idx = order[start : start + 256]
                loss = nn.functional.binary_cross_entropy_with_logits(
                    self.model(**{k: v[idx] for k, v in inputs.items()}), labels[idx]
                )
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
        self.epochs = 1
        if self.generator is not None:
            self.generator.observe(self.model)  # Θ_t


def main(out: Path | None = None) -> None:
    periods = reloop.synthetic_periods(
        periods=12, rows_per_period=2500, users=USERS, items=ITEMS, categories=CATEGORIES, seed=2
    )
    protocol: dict[str, Any] = {"pretrain": 2, "warmup": 4, "valid": 2}
    rows = []
    generators = {}
    for seed in (0, 1):
        rows += reloop.prequential(TwoTowerLearner(seed=seed), periods, run="IU", seed=seed, **protocol)
        gen = reloop.MetaGenerator({"asmg_gru": {"k": 2, "hidden": 4}}, batch_size=256, seed=seed)
        rows += reloop.prequential(TwoTowerLearner(gen, seed=seed), periods, run="ASMG-GRU", seed=seed, **protocol)
        generators[seed] = gen

    summary = reloop.summarize(rows)  # test periods, mean ± std over seeds, imp% vs IU
    for e in summary:
        print(f"{e['run']:>9}: test AUC {e['auc_mean']:.4f} ± {e['auc_std']:.4f}  imp% {e['auc_imp_pct']:+.2f}")
    assert all(g.ready for g in generators.values()), "the generator never served a generated model"
    assert len({r["period"] for r in rows if r["phase"] == "test"}) == 12 - 2 - 1 - 4 - 2
    assert all(e["auc_mean"] > 0.55 for e in summary), "a run did not learn"
    # The generated model is a TwoTower of its own, not the trained one.
    served = generators[0].serving_model()
    assert isinstance(served, TwoTower) and served is not None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        reloop.write_periods(rows, out / "periods.csv")
        reloop.plot_periods(
            rows,
            out / "periods.png",
            oracle=reloop.oracle_auc(periods),
            title="Two-tower model: IU vs ASMG-GRU (k = 2)",
        )
        print(f"wrote {out / 'periods.png'}")
    print("ok")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
