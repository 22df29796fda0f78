"""Test and benchmark tooling, kept out of the installed packages: a throwaway mongod with isolated FiftyOne
settings (`support.devdb`) and a FiftyOne App server driven by headless chromium (`support.devapp`).

Imported as `support.*` with tests/ on sys.path: pytest puts it there (tests/conftest.py, rootdir-less
`prepend` import mode); benchmarks insert it themselves."""
