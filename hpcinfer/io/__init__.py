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

from hpcinfer.io import ledger
from hpcinfer.io.collect import CollectError, collect
from hpcinfer.io.formats import make_format
from hpcinfer.io.readers import ShardReadError, ShardReader, find_duplicate_ids
from hpcinfer.io.rows import BadRow, InputRow, InputSpec, OutputRecord, prompt_too_long
from hpcinfer.io.writers import PartWriter

__all__ = ["BadRow", "CollectError", "InputRow", "InputSpec", "OutputRecord", "PartWriter",
           "ShardReadError", "ShardReader", "collect", "find_duplicate_ids", "ledger",
           "make_format", "prompt_too_long"]
