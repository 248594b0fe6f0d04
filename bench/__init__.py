"""Benchmarks of the sockexec_py broker against the machine's limits and the C sockexec.

Run ``python -m bench`` (full run), ``python -m bench --quick`` (about a minute) or
``python -m bench --tiny`` (seconds; what the smoke test runs); the measures are
listed in :mod:`bench.cli`. ``python -m bench.compare BASE_DIR`` compares two brokers.

Layout: :mod:`~bench.config` (presets, sizes, targets), :mod:`~bench.client` (parsers,
one-shot helpers), :mod:`~bench.many` (many sessions in one thread, the CPU meter),
:mod:`~bench.reference` (the C sockexec: found or built, run, its side of a row), one
module per group of measures (:mod:`~bench.roundtrips` rows 1-2,
:mod:`~bench.streaming` 3-5, :mod:`~bench.sessions` 6, :mod:`~bench.gateway` 7,
:mod:`~bench.runas` 8), :mod:`~bench.runner` (the daemons each group needs),
:mod:`~bench.report` (table, RESULTS.md) and :mod:`~bench.cli`.
"""
