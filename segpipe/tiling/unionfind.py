"""Union of labels that touch across tile borders: the one merge step of every tile-exact labelling.

Why this module: a connected set of pixels may cross any number of tiles, so no halo makes per-tile
labelling exact. Instance labelling and region growing (:mod:`segpipe.methods.regions`)
therefore end the same way: each tile labels its own core, the local labels are offset into one
scene-wide range of provisional labels, the pairs of provisional labels that touch across tile faces
are found, and a component is a connected set of that (small) graph of labels, never of pixels. One
function does that union for both, so that the two cannot drift apart.

The ordering guarantee: components are numbered 1..N in the order in which they first appear in
``order`` (by default the provisional labels themselves, i.e. tiles in scene order, then each tile's
labels in raster order). The numbers thus depend on nothing but that order: not on the order in which
Dask returned the tiles or the pairs, nor on how the graph library numbers its components. Which labels
form one component is the same for every tile size (it is the whole-image labelling), and since the
numbering is a fixed function of the labelling, a rerun or a resume gives bit-identical IDs; across
tile sizes the IDs agree up to renumbering.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def merge_pairs(n_total: int, pairs: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """Provisional label (1-based) -> component ID, consecutive from 1 in ``order`` of first appearance.

    ``pairs`` (N x 2, 1-based) are the labels that touch; a label in no pair is a component of its own.
    ``order`` (default ``1..n_total``) lists the provisional labels to number; a label it leaves out, and
    label 0 (background), map to 0. Returns a ``uint32`` lookup of length ``n_total + 1``.
    """
    ids = np.zeros(n_total + 1, np.uint32)
    if n_total == 0:
        return ids
    pairs = np.asarray(pairs).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0] - 1, pairs[:, 1] - 1)), shape=(n_total, n_total))
    _, root = connected_components(graph, directed=False)
    labels = np.arange(1, n_total + 1) if order is None else np.asarray(order, np.int64)
    roots = root[labels - 1]
    _, first = np.unique(roots, return_index=True)  # where each component first appears in ``order``
    number = np.zeros(int(root.max()) + 1, np.int64)
    number[roots[np.sort(first)]] = np.arange(1, len(first) + 1)
    ids[labels] = number[roots]
    return ids
