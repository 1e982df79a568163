"""The data layer: every file a stage writes and another reads, defined once.

    store       the Parquet shards of a synthesis run (DIALOGUE_SCHEMA, INPUT_SCHEMA) and atomic writing;
                the evaluations' per-system tables go through write_table too
    manifest    a synthesis run's OUT/manifest.json (new, reconcile on resume, read, write) and OUT/synth.lock
    dialogues   reading the dialogue rows back: a sandboxed DuckDB view, one prompt's (train, heldout) rows
    adapters    the adapter folder ADAPTERS/ID/ + genpi.json: writing, reading, the stale checks (prompt,
                base model), the data fingerprint that decides retraining
    runfolder   run folders: the lock file that keeps two runs out of one folder, local paths only, JSON
                records written whole

Stages import from here (synth, train, eval, serve, run); this package imports only the catalog, the engine
configuration and the model resolver below it.
"""
