"""FiftyOne's LanceDB similarity backend, with searches of a view and queries by sample id answered from the
table's vectors kept in memory.

FiftyOne's LanceDB index searches the whole table fast, but for anything else it copies the table: a view
that is not the whole dataset (a sidebar filter in the App, or searching within earlier results) makes it
read every row into pandas and write a `<table>_filter` table to disk on each query (2.3 s at 100k samples
here, `bench_app.py`; and the full table in memory), and a query by sample id (an image query from the App) reads every
row into pandas to find that vector. This backend answers those two from the table's `id` and `vector`
columns, read once per table version (a write to the table makes a new version) and kept in the process
(`vector_cache.cached`); whole-dataset searches stay LanceDB's own. Distances are LanceDB's: cosine
distance (1 - cosine similarity) and squared L2.

An index built with it stores this module's class path in its brain run, as `vector_cache`'s does."""
from __future__ import annotations

import numpy as np

from . import warmup

warmup.wait(lancedb=True)  # FiftyOne imports lancedb on first use below: never beside the warm-up

from fiftyone.brain.internal.core.lancedb import (LanceDBSimilarity, LanceDBSimilarityConfig,  # noqa: E402
                                                  LanceDBSimilarityIndex)

from .vector_cache import cached  # noqa: E402


class CachedLanceDBSimilarityConfig(LanceDBSimilarityConfig):
    """`LanceDBSimilarityConfig` whose index searches views and answers id queries from memory."""


class CachedLanceDBSimilarity(LanceDBSimilarity):
    def initialize(self, samples, brain_key):
        return CachedLanceDBSimilarityIndex(samples, self.config, brain_key, backend=self)


class CachedLanceDBSimilarityIndex(LanceDBSimilarityIndex):
    def _columns(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, dict]:
        """(ids, sample ids for patches or None, float32 vectors, {id: row}) of the whole table, as of its
        version."""
        table = self._table

        def load():
            data = table.to_arrow()
            vectors = data["vector"].combine_chunks()
            ids = data["id"].to_pylist()
            return (np.asarray(ids, dtype=object),
                    np.asarray(data["sample_id"].to_pylist(), dtype=object)
                    if "sample_id" in data.column_names else None,
                    vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
                    .reshape(-1, vectors.type.list_size),
                    {id_: row for row, id_ in enumerate(ids)})

        return cached(("lancedb", self.config.uri, self.config.table_name), table.version, load)

    @staticmethod
    def _rows(row_of: dict, ids) -> np.ndarray:
        """Table rows of these ids (those the table has), in their order. A dict, not np.isin: that compares
        object arrays pairwise (a minute for a 50k-sample view of 100k)."""
        return np.fromiter((row_of[i] for i in ids if i in row_of), dtype=np.int64)

    def _parse_neighbors_query(self, query):
        if not isinstance(query, str):
            array = np.asarray(query)
            if np.issubdtype(array.dtype, np.number):
                return array  # vectors: LanceDB's own path
        if self._table is None:
            return super()._parse_neighbors_query(query)
        single = isinstance(query, str)
        wanted = [query] if single else list(query)
        _, _, vectors, row_of = self._columns()
        rows = self._rows(row_of, wanted)
        if rows.size == 0:
            raise ValueError("Query IDs %s were not found in the index" % wanted)
        return vectors[rows[0]] if single else vectors[rows]

    def _kneighbors(self, query=None, k=None, reverse=False, aggregation=None, return_dists=False):
        if query is None or reverse or aggregation not in (None, "mean") or not self.has_view or self._table is None:
            return super()._kneighbors(query=query, k=k, reverse=reverse, aggregation=aggregation,
                                       return_dists=return_dists)  # its own search, or its own error
        query = np.asarray(self._parse_neighbors_query(query), np.float32)
        if aggregation == "mean" and query.ndim == 2:
            query = query.mean(axis=0)
        single = query.ndim == 1
        queries = np.atleast_2d(query)

        ids, sample_ids, vectors, row_of = self._columns()
        patches = self.config.patches_field is not None
        in_view = np.sort(self._rows(row_of, self.current_label_ids if patches else self.current_sample_ids))
        sub = vectors[in_view]
        k = len(in_view) if k is None else min(k, len(in_view))

        out_samples, out_labels, out_dists = [], [] if patches else None, []
        for q in queries:
            if self.config.metric == "cosine":
                norms = np.linalg.norm(sub, axis=1) * np.linalg.norm(q)
                dist = 1.0 - (sub @ q) / np.where(norms == 0, 1.0, norms)
            else:  # "euclidean": LanceDB's l2 is the squared distance
                diff = sub - q
                dist = np.einsum("ij,ij->i", diff, diff)
            top = np.argpartition(dist, k - 1)[:k] if 0 < k < len(dist) else np.arange(len(dist))
            top = top[np.argsort(dist[top], kind="stable")]
            rows = in_view[top]
            out_samples.append((sample_ids if patches else ids)[rows].tolist())
            if patches:
                out_labels.append(ids[rows].tolist())
            out_dists.append(dist[top].tolist())

        if single:
            out_samples, out_dists = out_samples[0], out_dists[0]
            out_labels = out_labels[0] if patches else None
        return (out_samples, out_labels, out_dists) if return_dists else (out_samples, out_labels)
