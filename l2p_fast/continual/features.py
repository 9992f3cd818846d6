"""The feature cache: the frozen backbone's feature of every text example, computed once and stored.

With a frozen text backbone and no augmentation, the feature of an example never changes: it is
the L2P query and the input of ``seq-frozen``'s head. The cache file is named after the backbone's
and the pool's fingerprints, so a changed model or data set never reads a stale cache. The file
holds the features and the SHA-256 of their bytes; an unreadable, mis-shaped, non-finite or
changed (digest mismatch: ``torch.load`` does not check the archive's CRCs) cache file is
recomputed, and the fact logged.

On several processes (:mod:`.distributed`) every rank reads the file; when any rank lacks a valid
one, the ranks compute the features together (each its share of the batches, summed exactly:
every row comes from one rank, the others add zeros) and rank 0 writes the file (:mod:`.output`).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import Tensor

from . import distributed
from .backbones import Backbone, encoder_features
from .batching import Pool, eval_batches
from .output import atomic_torch_save

log = logging.getLogger(__name__)


@torch.no_grad()
def compute_features(backbone: Backbone, pool: Pool, batch_size: int, device: torch.device | str = "cpu",
                     progress: bool = False) -> Tensor:
    """(len(pool), D) fp32 features of every pool item, computed in length-sorted batches, in pool order.

    On several processes each computes every ``world``-th batch and the rows are summed over the processes."""
    from tqdm.auto import tqdm

    model = backbone.model.to(device)
    model.eval()
    out = torch.zeros(len(pool), backbone.width, dtype=torch.float32)
    batches = eval_batches(torch.arange(len(pool)), batch_size, pool.lengths)
    mine = batches[distributed.rank()::distributed.world_size()]
    for batch in tqdm(mine, desc="caching features", unit="batch", leave=False,
                      disable=not progress or not distributed.is_main()):
        out[batch] = encoder_features(backbone.kind, model, pool.collate(batch, device)).float().cpu()
    if distributed.active():
        out = distributed.all_reduce_(out.to(device), "computing the feature cache").cpu()
    return out


def cached_features(backbone: Backbone, pool: Pool, cache_dir: str | Path, backbone_fingerprint: str,
                    batch_size: int, device: torch.device | str = "cpu", progress: bool = False) -> Tensor:
    """Features of ``pool`` from ``cache_dir`` when present and valid, else computed and stored there."""
    path = Path(cache_dir) / f"features-{backbone_fingerprint[:16]}-{pool.fingerprint()[:16]}.pt"
    found = _read_cache(path, (len(pool), backbone.width))
    missing = torch.tensor([found is None], dtype=torch.long, device=device)  # every rank takes the same branch
    if not int(distributed.all_reduce_(missing, "reading the feature cache")):
        return found
    features = compute_features(backbone, pool, batch_size, device, progress)
    atomic_torch_save({"features": features, "sha256": _digest(features)}, path)  # rank 0 writes
    return features


def _read_cache(path: Path, shape: tuple[int, int]) -> Tensor | None:
    """The features stored in ``path`` when it holds a valid cache of ``shape``, else None (a problem is logged)."""
    if not path.exists():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        log.warning("feature cache %s is unreadable (%s); recomputing", path, error)
        return None
    problem = _cache_problem(cached, shape)
    if problem is not None:
        log.warning("feature cache %s %s; recomputing", path, problem)
        return None
    return cached["features"]


def _digest(features: Tensor) -> str:
    return hashlib.sha256(features.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _cache_problem(cached: object, shape: tuple[int, int]) -> str | None:
    """Why a loaded cache file cannot be used (None when it can)."""
    if not isinstance(cached, dict) or not isinstance(cached.get("features"), Tensor):
        return "is not a features file of this version"
    features = cached["features"]
    if features.dtype != torch.float32 or tuple(features.shape) != shape:
        return f"holds {features.dtype} {tuple(features.shape)}, expected float32 {shape}"
    if cached.get("sha256") != _digest(features):
        return "fails its SHA-256 digest (a changed file)"
    if not bool(torch.isfinite(features).all()):
        return "holds NaN or inf"
    return None
