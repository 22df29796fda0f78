"""FiftyOne's sklearn similarity backend, with the index's vectors kept in memory between requests.

FiftyOne's App server answers each request with a freshly loaded dataset, so the stock sklearn index
re-reads every embedding from MongoDB for every text query (6 s at 100k samples here). This backend is
the stock one plus a process-level cache of those arrays, keyed by dataset, embeddings field and patches
field, and valid only while the dataset's samples are unchanged: the key carries a change marker (sample
count + latest `last_modified_at`, both answered by MongoDB indexes), read before the vectors, so a sample
added, deleted or edited after they were read means a reload on the next request.

An index built with it stores this module's class path in its brain run; any process with dinov2clip
installed (the App server included) then loads it through FiftyOne as usual. Everything else — queries,
`add_to_index`, `remove_from_index`, the on-disk format — is FiftyOne's sklearn backend."""
from __future__ import annotations

import os
import threading
from collections import OrderedDict

import numpy as np
from fiftyone.brain.internal.core.sklearn import (SklearnSimilarity, SklearnSimilarityConfig,
                                                  SklearnSimilarityIndex)

# Upper bound on the cached arrays of all indexes together (the newest entry is always kept).
CACHE_BYTES = int(float(os.environ.get("DINOV2CLIP_VECTOR_CACHE_MB", "4096")) * 2**20)

_CACHE: OrderedDict[tuple, tuple] = OrderedDict()  # key → (marker, (embeddings, sample_ids, label_ids))
_LOCK = threading.Lock()
stats = {"hits": 0, "loads": 0}  # for tests and benchmarks


def change_marker(dataset) -> tuple:
    """(sample count, latest last_modified_at): changes whenever a sample is added, deleted or edited.
    Both come from MongoDB without a scan (collection metadata; FiftyOne's last_modified_at index)."""
    coll = dataset._sample_collection
    latest = coll.find_one({}, sort=[("last_modified_at", -1)], projection={"last_modified_at": 1})
    return coll.estimated_document_count(), latest and latest.get("last_modified_at")


def _nbytes(data) -> int:
    return sum(getattr(a, "nbytes", 0) for a in data)  # arrays, and lancedb_index.RowBlocks


def _read_only(data):
    for a in data:
        if isinstance(a, np.ndarray):
            a.setflags(write=False)  # shared by every index built from this entry
    return data


def cached(key: tuple, marker, load):
    """`load()`'s arrays for `key`, kept while `marker` is unchanged; read-only, shared by every caller. The
    newest entries are kept up to CACHE_BYTES all together (the newest one always)."""
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0] == marker:
            _CACHE.move_to_end(key)
            stats["hits"] += 1
            return hit[1]
    data = _read_only(load())
    with _LOCK:
        stats["loads"] += 1
        _CACHE[key] = (marker, data)
        _CACHE.move_to_end(key)
        while len(_CACHE) > 1 and sum(_nbytes(d) for _, d in _CACHE.values()) > CACHE_BYTES:
            _CACHE.popitem(last=False)
    return data


class CachedSklearnSimilarityConfig(SklearnSimilarityConfig):
    """`SklearnSimilarityConfig` whose index keeps its vectors in memory between requests."""


class CachedSklearnSimilarity(SklearnSimilarity):
    def initialize(self, samples, brain_key):
        return CachedSklearnSimilarityIndex(samples, self.config, brain_key, backend=self)


class CachedSklearnSimilarityIndex(SklearnSimilarityIndex):
    @staticmethod
    def _parse_data(samples, config, embeddings=None, sample_ids=None, label_ids=None):
        if embeddings is not None or config.embeddings_field is None:  # vectors given, or kept in the run
            return SklearnSimilarityIndex._parse_data(samples, config, embeddings=embeddings,
                                                      sample_ids=sample_ids, label_ids=label_ids)
        dataset = samples._dataset
        key = (str(dataset._doc.id), dataset._sample_collection_name, config.embeddings_field, config.patches_field)
        marker = change_marker(dataset)  # before the read: a write during it shows up as a new marker
        return cached(key, marker, lambda: SklearnSimilarityIndex._parse_data(samples, config))

    def _kneighbors(self, query=None, *args, **kwargs):
        # A query vector from the App arrives as JSON, i.e. float64: sklearn would then copy every float32
        # vector to float64 for each query (0.4 GB at 100k samples). Rankings are the same in float32.
        if query is not None and not isinstance(query, str) and self._embeddings is not None:
            as_array = np.asarray(query)
            if as_array.dtype.kind == "f" and as_array.dtype != self._embeddings.dtype:
                query = as_array.astype(self._embeddings.dtype)
        return super()._kneighbors(query, *args, **kwargs)

    def _own_arrays(self):
        """Private, writable copies before FiftyOne's sklearn code edits the arrays in place."""
        for name in ("_embeddings", "_sample_ids", "_label_ids"):
            value = getattr(self, name)
            if isinstance(value, np.ndarray) and not value.flags.writeable:
                setattr(self, name, value.copy())

    def _get_neighbors(self, can_use_neighbors=True, can_use_dists=True):
        if self._neighbors_helper is None and can_use_dists:
            # FiftyOne's helper centres the vectors in place before precomputing all distances (an image
            # query on ≤ 15k samples): give it this index's own copy, never the shared one.
            self._own_arrays()
        return super()._get_neighbors(can_use_neighbors=can_use_neighbors, can_use_dists=can_use_dists)

    def add_to_index(self, *args, **kwargs):
        self._own_arrays()
        return super().add_to_index(*args, **kwargs)

    def remove_from_index(self, *args, **kwargs):
        self._own_arrays()
        return super().remove_from_index(*args, **kwargs)


def clear() -> None:
    with _LOCK:
        _CACHE.clear()
