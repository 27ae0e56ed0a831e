"""Functions the distributed tests launch in several processes (spawned workers import them by name, so
they live in a module of their own rather than in a test file)."""

from __future__ import annotations

import torch

from dlpipe.training import distributed
from dlpipe.training.loop import TrainConfig, build_model, resolve_config
from dlpipe.training.registry import get_spec
from dlpipe.training.tasks.classification import classification_loss, prepare_images


def config(model: str, dataset: str, limit: int, batch_size: int) -> TrainConfig:
    """Plain SGD, no augmentation or schedule: the run a single process can replay step by step."""
    return resolve_config(TrainConfig(model=model, dataset=dataset, limit=limit, batch_size=batch_size, lr=0.05,
                                      optimizer="sgd", schedule="none", augment="none", weight_decay=0.0,
                                      progress=False, init="default", batch_norm=False))


def fresh_model(cfg: TrainConfig, dense: bool):
    """The task's data (this rank's shard when distributed) and the model, built from ``cfg.seed``."""
    run = prepare_images(cfg, get_spec(cfg.model), dense=dense)
    torch.manual_seed(cfg.seed)
    model, _ = build_model(get_spec(cfg.model), run.model_args, cfg.model_args)
    return run, model


def ddp_steps(model_name: str, dataset: str, limit: int, batch_size: int, steps: int, dense: bool = False) -> dict:
    """``steps`` DDP steps of plain SGD on this rank's shard (per-process ``batch_size``).

    Returns:
        This rank's sample indices in order, its per-step losses and its parameters after the steps.
    """
    torch.set_num_threads(1)
    with distributed.session(60):
        cfg = config(model_name, dataset, limit, batch_size)
        run, model = fresh_model(cfg, dense)
        wrapped = distributed.wrap(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        distributed.set_epoch(run.train_loader, 0)
        indices = list(iter(run.train_loader.sampler))
        losses = []
        model.train()
        for step, (images, labels) in enumerate(run.train_loader):
            if step == steps:
                break
            loss, _ = classification_loss(wrapped(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return {"rank": distributed.rank(), "world": distributed.world_size(), "indices": indices[:steps * batch_size],
                "losses": losses, "params": [p.detach().clone() for p in model.parameters()]}
