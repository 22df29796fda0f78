"""Which similarity backend an index gets when the caller names none (light: imports nothing heavy, so the
CLI and the plugin's forms can quote it)."""

# From this many samples a default index is LanceDB's table on disk rather than sklearn (both FiftyOne's own
# backends): sklearn's first text query in a fresh App server reads every vector from MongoDB, LanceDB scans its
# table. The crossover comes from benchmarks/bench_app.py (figures: docs/measurements.md, "Text search in the
# App"; the reasoning: docs/fiftyone-indexes.md).
LANCEDB_FROM = 30_000

AUTO_HELP = (f"sklearn below {LANCEDB_FROM:,} samples, lancedb from there if installed (its first App query reads "
             "the vectors from a table on disk, not from MongoDB); FiftyOne's default backend if you changed it")
