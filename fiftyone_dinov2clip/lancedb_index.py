"""FiftyOne's LanceDB similarity backend, searching the table's vectors kept in memory.

FiftyOne's LanceDB index scans its table on disk for every query, with no ANN index: 0.2-0.3 s at 100k
rows and 3.5 s at 1M in the App server here (`bench_app.py`, README). For anything but the whole
dataset it copies the table: a view (a sidebar filter in the App, or searching within earlier results) makes
it read every row into pandas and write a `<table>_filter` table to disk on each query (2.3 s at 100k), and
a query by sample id (an image query from the App) reads every row into pandas to find that vector. This
backend answers all three from the table's `id` and `vector` columns, read once per table version (a write
to the table makes a new version) and kept in the process (`vector_cache.cached`), exactly (no
approximation): one matrix-vector product, ~0.2 s at 1M. The read costs about one LanceDB scan (6-9 s at 1M
here), so it is done by the first search, in its thread: reading on a background thread while that search
scanned made the first query twice as slow (both read the table through LanceDB's one event loop).
Whole-table searches stay LanceDB's own scan where the table's vectors would not fit the cache's budget
(`DINOV2CLIP_VECTOR_CACHE_MB`, 4096 by default: 2M 512-d vectors). Distances are LanceDB's: cosine
distance (1 - cosine similarity) and squared L2.

An index built with it stores this module's class path in its brain run, as `vector_cache`'s does."""
from __future__ import annotations

import numpy as np

from . import warmup

warmup.wait(lancedb=True)  # FiftyOne imports lancedb on first use below: never beside the warm-up

from fiftyone.brain.internal.core.lancedb import (LanceDBSimilarity, LanceDBSimilarityConfig,  # noqa: E402
                                                  LanceDBSimilarityIndex)

from . import vector_cache  # noqa: E402
from .vector_cache import cached  # noqa: E402


class RowBlocks:
    """A float32 matrix kept as the row blocks LanceDB read it in: views of its Arrow buffers, never copied
    into one array. On this VM a fresh 2 GiB array costs ~5 s of first-touch page faults (1M 512-d rows),
    more than LanceDB's read itself; a product with a vector goes block by block (~1000 blocks at 1M)."""

    def __init__(self, blocks: list[np.ndarray]):
        self.blocks = blocks
        self.dim = blocks[0].shape[1] if blocks else 0
        self.starts = np.cumsum([0] + [len(b) for b in blocks])
        self.nbytes = sum(b.nbytes for b in blocks)  # vector_cache's budget counts it

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __matmul__(self, q: np.ndarray) -> np.ndarray:
        return np.concatenate([b @ q for b in self.blocks]) if self.blocks else np.empty(0, np.float32)

    def squares(self) -> np.ndarray:
        return (np.concatenate([np.einsum("ij,ij->i", b, b) for b in self.blocks]) if self.blocks
                else np.empty(0, np.float32))

    def __getitem__(self, rows) -> np.ndarray:
        """Rows by index (an int, or an array of them), copied out in that order."""
        if np.ndim(rows) == 0:
            row = int(rows)
            block = int(np.searchsorted(self.starts, row, side="right")) - 1
            return self.blocks[block][row - self.starts[block]]
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.dim), np.float32)
        block = np.searchsorted(self.starts, rows, side="right") - 1
        order = np.argsort(block, kind="stable")
        bounds = np.searchsorted(block[order], np.arange(len(self.blocks) + 1))
        for b in np.nonzero(np.diff(bounds))[0]:
            at = order[bounds[b]:bounds[b + 1]]
            out[at] = self.blocks[b][rows[at] - self.starts[b]]
        return out


class CachedLanceDBSimilarityConfig(LanceDBSimilarityConfig):
    """`LanceDBSimilarityConfig` whose index searches the table's vectors in memory."""


class CachedLanceDBSimilarity(LanceDBSimilarity):
    def initialize(self, samples, brain_key):
        return CachedLanceDBSimilarityIndex(samples, self.config, brain_key, backend=self)


class CachedLanceDBSimilarityIndex(LanceDBSimilarityIndex):
    def _cache_key(self) -> tuple:
        return ("lancedb", self.config.uri, self.config.table_name)

    def _columns(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray, dict]:
        """(ids, sample ids for patches or None, float32 vectors, their squared norms, {id: row}) of the whole
        table, as of its version; read now if they are not in memory."""
        table = self._table

        def load():
            patches = self.config.patches_field is not None  # then ids are label ids, sample_id the samples'
            columns = ["id", "vector"] + (["sample_id"] if patches else [])
            blocks, ids, sample_ids = [], [], [] if patches else None
            for batch in table.search().select(columns).limit(table.count_rows()).to_batches():
                vectors = batch.column("vector")
                blocks.append(vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
                              .reshape(batch.num_rows, vectors.type.list_size))
                ids += batch.column("id").to_pylist()
                if patches:
                    sample_ids += batch.column("sample_id").to_pylist()
            matrix = RowBlocks(blocks)
            return (np.asarray(ids, dtype=object),
                    None if sample_ids is None else np.asarray(sample_ids, dtype=object),
                    matrix,
                    matrix.squares(),
                    {id_: row for row, id_ in enumerate(ids)})

        return cached(self._cache_key(), table.version, load)

    def _fits_memory(self) -> bool:
        """Whether the table's vectors fit the cache's budget (`DINOV2CLIP_VECTOR_CACHE_MB`). Past it, a
        whole-table search is LanceDB's own scan, which reads the table from disk each time."""
        table = self._table
        return table.count_rows() * table.schema.field("vector").type.list_size * 4 <= vector_cache.CACHE_BYTES

    @staticmethod
    def _rows(row_of: dict, ids) -> np.ndarray:
        """Table rows of these ids (those the table has), in their order. A dict, not np.isin: that compares
        object arrays pairwise (a minute for a 50k-sample view of 100k)."""
        return np.fromiter((row_of[i] for i in ids if i in row_of), dtype=np.int64)

    def _parse_neighbors_query(self, query, columns=None):
        """Vectors as given; ids looked up in the table's columns (`columns`: as `_kneighbors` fetched them)."""
        if not isinstance(query, str):
            array = np.asarray(query)
            if np.issubdtype(array.dtype, np.number):
                return array  # vectors: LanceDB's own path
        if self._table is None:
            return super()._parse_neighbors_query(query)
        single = isinstance(query, str)
        wanted = [query] if single else list(query)
        _, _, vectors, _, row_of = columns or self._columns()
        rows = self._rows(row_of, wanted)
        if rows.size == 0:
            raise ValueError("Query IDs %s were not found in the index" % wanted)
        return vectors[rows[0]] if single else vectors[rows]

    def _kneighbors(self, query=None, k=None, reverse=False, aggregation=None, return_dists=False):
        if query is None or reverse or aggregation not in (None, "mean") or self._table is None:
            return super()._kneighbors(query=query, k=k, reverse=reverse, aggregation=aggregation,
                                       return_dists=return_dists)  # its own error
        if not (self.has_view or self._fits_memory()):
            return super()._kneighbors(query=query, k=k, aggregation=aggregation, return_dists=return_dists)
        columns = self._columns()
        query = np.asarray(self._parse_neighbors_query(query, columns), np.float32)
        if aggregation == "mean" and query.ndim == 2:
            query = query.mean(axis=0)
        single = query.ndim == 1
        queries = np.atleast_2d(query)

        ids, sample_ids, vectors, squares, row_of = columns
        patches = self.config.patches_field is not None
        if self.has_view:
            in_view = np.sort(self._rows(row_of, self.current_label_ids if patches else self.current_sample_ids))
        else:
            in_view = np.arange(len(ids))
        k = len(in_view) if k is None else min(k, len(in_view))

        out_samples, out_labels, out_dists = [], [] if patches else None, []
        for q in queries:
            rows, dist = self._nearest(vectors, squares, in_view, q, k)
            out_samples.append((sample_ids if patches else ids)[rows].tolist())
            if patches:
                out_labels.append(ids[rows].tolist())
            out_dists.append(dist.tolist())

        if single:
            out_samples, out_dists = out_samples[0], out_dists[0]
            out_labels = out_labels[0] if patches else None
        return (out_samples, out_labels, out_dists) if return_dists else (out_samples, out_labels)

    def _nearest(self, vectors, squares, in_view, q, k) -> tuple[np.ndarray, np.ndarray]:
        """(table rows, distances) of the k nearest of the rows in_view to q, nearest first, with LanceDB's
        distances. Candidates come from one product with q (over every row when the view is most of the
        table: one pass over the matrix costs less than copying most of it); the returned distances are
        computed directly from the candidates' vectors."""
        if len(in_view) * 2 >= len(vectors):
            dots = (vectors @ q)[in_view]
        else:
            dots = vectors[in_view] @ q
        sq = squares[in_view]
        q2 = float(q @ q)
        if self.config.metric == "cosine":
            approx = -dots / np.sqrt(np.maximum(sq, 1e-30))  # the order of 1 - cos
        else:  # "euclidean": LanceDB's l2 is the squared distance
            approx = sq - 2 * dots
        keep = min(len(approx), k + max(16, k))  # margin: float32 rounding can swap near-equal distances
        top = np.argpartition(approx, keep - 1)[:keep] if 0 < keep < len(approx) else np.arange(len(approx))
        cand = vectors[in_view[top]]
        if self.config.metric == "cosine":
            norms = np.linalg.norm(cand, axis=1) * np.sqrt(q2)
            dist = 1.0 - (cand @ q) / np.where(norms == 0, 1.0, norms)
        else:
            diff = cand - q
            dist = np.einsum("ij,ij->i", diff, diff)
        order = np.lexsort((in_view[top], dist))[:k]
        return in_view[top][order], dist[order]
