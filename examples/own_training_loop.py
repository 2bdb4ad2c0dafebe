"""(a) ReLoop's self-correcting loss in a plain PyTorch training loop, on your own model.

The loop is what most pipelines already do every period: serve the new period with the current model,
log what was served, then train on the period once its labels are in. ReLoop (Cai et al., SIGIR 2022)
changes one line: the loss also gets ``y_last``, the probability that was served for each row, and
penalises the new model only where it does worse than that.

Run: ``python examples/own_training_loop.py`` (a few seconds on a CPU; no data files needed).
"""

from __future__ import annotations

import torch
from torch import nn

import reloop

torch.set_num_threads(1)
USERS, ITEMS, CATEGORIES = 200, 100, 10


class MyCTRModel(nn.Module):
    """Your model: anything that maps a batch to one logit per row."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.user = nn.Embedding(USERS, dim)
        self.item = nn.Embedding(ITEMS, dim)
        self.category = nn.Embedding(CATEGORIES, dim)
        self.hour = nn.Embedding(24, dim)
        self.mlp = nn.Sequential(nn.Linear(4 * dim, 32), nn.ReLU(), nn.Linear(32, 1))
        for table in (self.user, self.item, self.category, self.hour):
            nn.init.normal_(table.weight, std=0.01)

    def forward(
        self, user: torch.Tensor, item: torch.Tensor, category: torch.Tensor, hour: torch.Tensor
    ) -> torch.Tensor:
        x = torch.cat([self.user(user), self.item(item), self.category(category), self.hour(hour)], dim=1)
        return self.mlp(x).squeeze(-1)


def train_one_period(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    served: torch.Tensor,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
) -> None:
    """One pass over a period. The only ReLoop-specific part: ``served`` goes to the loss as y_last."""
    model.train()
    order = torch.randperm(len(labels), generator=generator)
    for start in range(0, len(labels), batch_size):
        idx = order[start : start + batch_size]
        logits = model(**{k: v[idx] for k, v in inputs.items()})
        loss = loss_fn(logits, labels[idx], served[idx])  # SelfCorrectionLoss(logits, labels, y_last)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@torch.no_grad()
def serve(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    return torch.sigmoid(model(**inputs))


def run(alpha: float, periods: list[reloop.Period], pretrain: int = 3) -> list[float]:
    """Serve-then-train over the periods; returns the AUC of every served period after pretraining."""
    torch.manual_seed(0)
    model = MyCTRModel()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = reloop.SelfCorrectionLoss(alpha)  # alpha = 0: plain binary cross-entropy
    shuffle = torch.Generator().manual_seed(0)
    aucs = []
    for t, period in enumerate(periods):
        served = serve(model, period.inputs)  # what production served for these rows (y_last)
        if t >= pretrain:
            aucs.append(reloop.auc(period.labels.numpy(), served.numpy()))
        epochs = 3 if t < pretrain else 1
        for _ in range(epochs):
            train_one_period(model, optimizer, loss_fn, period.inputs, period.labels, served, generator=shuffle)
    return aucs


def main() -> None:
    periods = reloop.synthetic_periods(
        periods=10, rows_per_period=3000, users=USERS, items=ITEMS, categories=CATEGORIES, seed=1
    )
    # The loss itself: α = 0 is BCE exactly; the self-correction term only adds where the model is worse.
    logits, labels = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.0])
    y_last = torch.tensor([0.95, 0.1, 0.7])  # the last model was better on rows 0 and 1, worse on row 2
    bce = nn.functional.binary_cross_entropy_with_logits(logits, labels)
    assert torch.isclose(reloop.SelfCorrectionLoss(0.0)(logits, labels, y_last), bce)
    sc = reloop.SelfCorrectionLoss(1.0)(logits, labels, y_last)
    p = torch.sigmoid(logits)
    assert torch.isclose(sc, ((0.95 - p[0]) + (p[1] - 0.1)) / 3)  # row 2 (better than last) adds nothing

    base = run(0.0, periods)
    corrected = run(0.5, periods)
    mean = lambda xs: sum(xs) / len(xs)
    oracle = reloop.oracle_auc(periods)
    print(f"served periods: {len(base)}; oracle AUC {mean(list(oracle.values())[3:]):.4f}")
    print(f"BCE          : mean AUC {mean(base):.4f}")
    print(f"ReLoop α=0.5 : mean AUC {mean(corrected):.4f} ({(mean(corrected) / mean(base) - 1) * 100:+.2f}%)")
    assert mean(base) > 0.6 and mean(corrected) > 0.6, "the model did not learn"
    print("ok")


if __name__ == "__main__":
    main()
