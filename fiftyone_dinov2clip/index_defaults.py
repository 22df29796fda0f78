"""Which similarity backend an index gets when the caller names none (light: imports nothing heavy, so the
CLI and the plugin's forms can quote it)."""

# From this many samples a default index is LanceDB's table on disk rather than sklearn (both FiftyOne's own
# backends): sklearn's first text query in a fresh App server reads every vector from MongoDB (~0.07 s per 1k
# samples here, 7.3 s at 100k) while LanceDB scans its table (a first query of 0.8 s at 100k). Measured with
# benchmarks/bench_app.py (docs/measurements.md, "Text search in the App"); docs/fiftyone-indexes.md.
LANCEDB_FROM = 30_000

AUTO_HELP = (f"sklearn below {LANCEDB_FROM:,} samples, lancedb from there if installed (its first App query reads "
             "the vectors from a table on disk, not from MongoDB); FiftyOne's default backend if you changed it")
