"""Centralized baseline: the same model trained on the union of all clients' training data.

The union of the clients' training sets does not depend on the partition (partitions only
decide which client holds which training row), so one baseline per (task, seed) serves
every federated configuration. Test accuracy is measured on the server's global test set
after every epoch.

    python -m pqfed.services.centralized --task breast-cancer --epochs 30 --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from .data import TASKS, default_partition, load_task
from .models import HPARAMS, build_model, count_parameters, evaluate, train_epochs

__all__ = ["train_centralized"]


def train_centralized(
    task: str,
    epochs: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    lr: float | None = None,
) -> dict[str, Any]:
    """Train centrally and report per-epoch global-test accuracy (JSON-serializable dict)."""
    cfg = HPARAMS.get(task)
    if cfg is None:
        raise ValueError(f"task: unknown task {task!r}; use one of {', '.join(sorted(HPARAMS))}")
    n_epochs = cfg.epochs if epochs is None else epochs
    bs = cfg.batch_size if batch_size is None else batch_size
    rate = cfg.lr if lr is None else lr
    if n_epochs < 1:
        raise ValueError("epochs: must be >= 1")
    t0 = time.perf_counter()
    ds = load_task(task, 1, default_partition(task), seed)
    load_s = time.perf_counter() - t0
    x, y = ds.union_train()
    model = build_model(task, seed)
    opt = torch.optim.Adam(model.parameters(), lr=rate)
    history: list[dict[str, float]] = []
    t1 = time.perf_counter()
    for epoch in range(n_epochs):
        train_loss = train_epochs(
            model, x, y, 1, bs, rate, seed=seed * 100_003 + epoch, optimizer=opt
        )
        test_loss, test_acc = evaluate(model, ds.x_test_global, ds.y_test_global)
        history.append({
            "epoch": epoch + 1,
            "train_loss": round(train_loss, 5),
            "test_loss": round(test_loss, 5),
            "test_accuracy": round(test_acc, 5),
        })
    train_s = time.perf_counter() - t1
    accs = [h["test_accuracy"] for h in history]
    return {
        "task": task,
        "simulated": ds.simulated,
        "seed": seed,
        "epochs": n_epochs,
        "batch_size": bs,
        "lr": rate,
        "optimizer": "adam",
        "n_params": count_parameters(model),
        "n_train": len(y),
        "n_test": len(ds.y_test_global),
        "final_test_accuracy": accs[-1],
        "best_test_accuracy": max(accs),
        "best_epoch": accs.index(max(accs)) + 1,
        "load_seconds": round(load_s, 3),
        "train_seconds": round(train_s, 3),
        "torch_threads": torch.get_num_threads(),
        "history": history,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--task", choices=[*sorted(TASKS), "all"], default="all")
    parser.add_argument("--epochs", type=int, default=None, help="default: per-task HPARAMS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = sorted(TASKS) if args.task == "all" else [args.task]
    results = [train_centralized(t, args.epochs, args.seed) for t in tasks]
    json.dump(results[0] if len(results) == 1 else results, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
