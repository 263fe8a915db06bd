"""The worker's data path: streaming readers, row validation, atomic part writers, the
resume ledger and collect. Compute side; nothing here imports the engine (pyarrow is
imported only when a Parquet file is touched).

    state = ledger.recover(shard_dir)                    # done rows, next part number
    reader = ShardReader(shard, InputSpec.from_config(cfg.input, cfg.task))
    writer = PartWriter(shard_dir, make_format(...).with_column_types(reader.column_types()),
                        next_part=state.next_part, commit_every_rows=..., commit_every_s=...)
    for item in reader:                                  # InputRow | BadRow
        if item.index in state.done_indices: continue
        ...                                              # add_error / engine -> add_result
        writer.maybe_commit()                            # and writer.commit() on the signal
    writer.commit(); ledger.mark_done(shard_dir, reader.num_rows)

``shard_loop.process_shard`` is this loop with a synchronous answer function.
"""
from __future__ import annotations

import importlib

# Names resolve on first use (PEP 562), so a login-side import of one small module here
# (hpcinfer.io.constraints from `hpcinfer validate`/`render`) does not pay for the readers,
# writers and ledger: `hpcinfer render` has a 0.3 s budget on a slow login node. Submodules
# (ledger, collect, ...) import as usual: `from hpcinfer.io import ledger`.
_WHERE = {
    "CollectError": "hpcinfer.io.collect",
    "make_format": "hpcinfer.io.formats",
    "ShardReadError": "hpcinfer.io.readers", "ShardReader": "hpcinfer.io.readers",
    "find_duplicate_ids": "hpcinfer.io.readers",
    "BadRow": "hpcinfer.io.rows", "InputRow": "hpcinfer.io.rows", "InputSpec": "hpcinfer.io.rows",
    "OutputRecord": "hpcinfer.io.rows", "prompt_too_long": "hpcinfer.io.rows",
    "PartWriter": "hpcinfer.io.writers",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'hpcinfer.io' has no attribute {name!r}")
    module = importlib.import_module(_WHERE[name])
    value = globals()[name] = getattr(module, name)
    return value
