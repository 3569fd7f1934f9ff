"""Embedding and prediction across processes: ``torchrun``/``accelerate launch -m sane_hf embed``.

Under a launcher every rank reads the networks in the same order (reading is cheap; aligning and
encoding them is not), keeps every ``world``-th one (rank ``r`` the networks ``r, r + world,
...``), runs the processor and SANE on that share, and the shares are gathered back into the
order of one process: the ids, rows and values are those of a one-process run. The ranks join the
process group of `sane_hf.zoo.distributed` (gloo: only finished embeddings travel, on the CPU).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.distributed as dist

from sane_hf.downstream.embedding import Embeddings
from sane_hf.models.sane.network_inputs import NamedWeights, NetworkInput, iter_networks
from sane_hf.zoo.distributed import Ranks, my_share


def my_networks(
    networks: NetworkInput | Iterable[NetworkInput], ranks: Ranks
) -> tuple[list[int], list[NamedWeights]]:
    """This rank's share of ``networks``: their positions in the one-process order, and the
    networks with the ids they were read with."""
    indexed = list(enumerate(iter_networks(networks)))
    share = my_share(indexed, ranks)
    return [index for index, _ in share], [NamedWeights(*network) for _, network in share]


def gather_embeddings(indices: list[int], part: Embeddings | None, ranks: Ranks) -> Embeddings:
    """Every rank's ``part`` (``None`` for a rank left without networks), on every rank, rows in
    the order of ``indices`` across ranks, i.e. the one-process order."""
    parts: list = [None] * ranks.world
    dist.all_gather_object(parts, (indices, part))
    parts = [(rows, embeddings) for rows, embeddings in parts if embeddings is not None]
    order = torch.from_numpy(np.argsort(np.concatenate([rows for rows, _ in parts]), kind="stable"))
    return concatenate_embeddings([embeddings for _, embeddings in parts], order)


def concatenate_embeddings(
    pieces: list[Embeddings], order: torch.Tensor | None = None
) -> Embeddings:
    """The rows of ``pieces`` one after the other (then in ``order``, when given): the chunks
    of one process' run, or the shares of several processes."""
    order = torch.arange(sum(len(piece.mean) for piece in pieces)) if order is None else order

    def joined(name: str) -> torch.Tensor | None:
        values = [getattr(piece, name) for piece in pieces]
        return None if values[0] is None else torch.cat(values)[order]

    names = pieces[0].properties
    ids = [network_id for piece in pieces for network_id in piece.ids]
    return Embeddings(
        mean=joined("mean"),
        layer_means=joined("layer_means"),
        token_latents=joined("token_latents"),
        properties={
            name: np.concatenate([piece.properties[name] for piece in pieces])[order.numpy()]
            for name in names
        },
        ids=[ids[i] for i in order.tolist()] if ids else [],
        extras={
            name: np.concatenate([piece.extras[name] for piece in pieces])[order.numpy()]
            for name in pieces[0].extras
        },
    )
