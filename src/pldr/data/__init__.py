"""Training data: sources, tokenisation with an on-disk cache, chunking, and the batch loader.

The pipeline follows the original release (docs/data.md):

1. `load_documents(data, split)` reads documents from a data source (`builtin`, a local file
   or folder, or `hf:NAME[:CONFIG]`) and takes a slice such as `train[:90%]`.
2. `load_tokens(...)` encodes every document with EOS appended (no BOS) into one flat int32
   array plus document offsets, cached on disk keyed by the data and the tokenizer.
3. `chunk_spans` / `chunk_tokens` group the documents (`group_size` of them at a time),
   concatenate each group and cut it into chunks in one of three modes: `pack`, `pad`,
   `nopad`. Chunks are `context_length + 1` tokens long: a model reads `chunk[:-1]` and
   predicts `chunk[1:]`.
4. `TokenBatches` yields LongTensor batches [B, context_length + 1] of chunks, shuffled per
   epoch from a seed, split over ranks without overlap, and resumable at any batch.

`build_loaders` does all four for a training and a validation split.

For corpora larger than memory, `prepare_store(data, out, tokenizer, workers=N)` (prepare.py,
`pldr data prepare`) streams the documents (`stream_source`), tokenises them in N processes
and writes a token store (store.py): shards of uint16/uint32 ids with document offsets and a
manifest. `load_tokens` and `build_loaders` given a store folder memory-map it instead of
tokenising, with the same documents, chunks and batches as the source. This package imports
only the leaves of `pldr` (errors, files), never the model.
"""

from .chunks import MODES, PAD_ID, Chunks, chunk_spans, chunk_tokens
from .loader import TokenBatches, build_loaders
from .prepare import PrepareReport, prepare_store
from .sources import (
           load_table,
           BUILTIN,
           DEFAULT_HF_DATA,
           TEXT_COLUMNS,
           DataSource,
           load_documents,
           parse_source,
)
from .splits import (
           DEFAULT_TRAIN_SPLIT,
           DEFAULT_VAL_SPLIT,
           Split,
           default_splits,
           parse_split,
)
from .stream import stream_source
from .store import ShardedTokens, TokenStore, is_store
from .tokenizer import Tokenizer
from .tokens import TokenizedDocs, load_tokens, token_cache_dir, tokenize_documents

__all__ = ["Tokenizer", "DataSource", "parse_source", "load_documents", "BUILTIN",
           "DEFAULT_HF_DATA", "TEXT_COLUMNS", "load_table", "Split", "parse_split", "default_splits",
           "DEFAULT_TRAIN_SPLIT", "DEFAULT_VAL_SPLIT", "TokenizedDocs", "tokenize_documents",
           "load_tokens", "token_cache_dir", "Chunks", "chunk_spans", "chunk_tokens", "MODES",
           "PAD_ID", "TokenBatches", "build_loaders", "stream_source", "prepare_store",
           "PrepareReport", "TokenStore", "ShardedTokens", "is_store"]
