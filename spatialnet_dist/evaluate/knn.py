"""The online k-nearest-neighbour accuracy of the frozen encoder (eval.knn), as self-supervised frameworks watch a
pretraining run without fine-tuning it (DINO's eval_knn.py, lightly's knn_predict, solo-learn's WeightedKNNClassifier).

The bank: the pooled encoder vectors (model.encode, L2-normalised) of up to eval.knn.max_train images of a labelled
corpus's train split. Each val image of the corpus takes its eval.knn.k most cosine-similar bank vectors; each votes
for its class with weight exp(similarity / TEMPERATURE); the predicted class has the largest sum. The accuracy is the
share of val images whose prediction is their class. Every rank embeds its share of both splits; rank 0 gathers them
and votes. evaluate/run.py ValidationPass logs it at each validation as val/knn_accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spatialnet_dist.data.batches import make_labelled_loader
from spatialnet_dist.store.manifest import TRAIN_SPLIT

TEMPERATURE = 0.07  # DINO's and lightly's: a near neighbour outvotes many far ones (exp(1 / 0.07) ~ 1.6e6)
QUERY_CHUNK = 1024  # val vectors voted at once: a (chunk, bank) similarity matrix at a time, as DINO chunks them
VAL_SPLIT = "val"  # the split periodic validation reads (train/trainer.py)


def weighted_knn(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int,
                 temperature: float = TEMPERATURE) -> torch.Tensor:
    """bank (N, D), bank_labels (N,) int64, queries (Q, D) -> (Q,) int64 predicted classes: the class with the largest
    sum of exp(cosine similarity / temperature) over the query's min(k, N) most similar bank vectors. A tie goes to
    the lowest class id (argmax's first)."""
    bank, classes = F.normalize(bank.float(), dim=1), int(bank_labels.max()) + 1
    predictions = []
    for chunk in F.normalize(queries.float(), dim=1).split(QUERY_CHUNK):
        similarity, neighbour = (chunk @ bank.T).topk(min(k, len(bank)), dim=1)  # (q, k) each
        votes = torch.zeros(len(chunk), classes).scatter_add_(1, bank_labels[neighbour], (similarity / temperature).exp())
        predictions.append(votes.argmax(1))  # (q,)
    return torch.cat(predictions)


@torch.no_grad()
def _embed(model, loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(pooled vectors (B, D) float32 on the CPU, labels (B,))] of the loader's sub-batches."""
    param = next(model.parameters())
    out = []
    for sub in loader:
        _, pooled = model.encode(sub["image"].to(param.device, param.dtype))  # (B, D)
        out.append((pooled.float().cpu(), sub["label"]))
    return out


def _gather(mine: list[tuple[torch.Tensor, torch.Tensor]], rank: int,
            world_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """All ranks' (vectors (n, D), labels (n,)) on rank 0 (a collective: every rank calls it); None on the others
    and when no rank has any."""
    parts = [mine]
    if world_size > 1:
        import torch.distributed as dist

        parts = [None] * world_size
        dist.all_gather_object(parts, mine)
    pairs = [pair for part in parts for pair in part]
    if rank or not pairs:
        return None
    return torch.cat([vectors for vectors, _ in pairs]), torch.cat([labels for _, labels in pairs])


def knn_accuracy(model, cfg, rank: int, world_size: int) -> float | None:
    """eval.knn's accuracy of `model`'s encoder as it is (eval mode, no gradients). Every rank calls it (it gathers);
    -> the accuracy on rank 0, None on the others and when the corpus has no labelled train or val image."""
    knn = cfg.eval.knn
    batch_size = max(getattr(cfg.tasks, t).batch_size for t in cfg.tasks.enabled())  # a sub-batch the run fits

    def vectors(split: str, limit: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        loader = make_labelled_loader(cfg, knn.corpus, split, rank, world_size, limit, batch_size)
        return _gather(_embed(model, loader), rank, world_size)

    bank, queries = vectors(TRAIN_SPLIT, knn.max_train), vectors(VAL_SPLIT, 0)
    if bank is None or queries is None:
        return None
    predicted = weighted_knn(*bank, queries[0], knn.k)
    return (predicted == queries[1]).float().mean().item()
