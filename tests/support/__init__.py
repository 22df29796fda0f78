"""Test and benchmark tooling, kept out of the installed packages: a throwaway mongod with isolated FiftyOne
settings (`support.devdb`) and a FiftyOne App server driven by headless chromium (`support.devapp`).

Imported as `support.*` with tests/ on sys.path: pytest's default `prepend` import mode puts it there (tests/
has no __init__.py, and holds a conftest.py); benchmarks insert it themselves."""
