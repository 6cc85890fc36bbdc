"""Training data: one reader of every source, tokenisation into token stores, chunking, and
the batch loader.

The pipeline follows the original release (docs/data.md):

1. `stream_source(data, split)` describes the documents of a data source (`builtin`, a
   local file or folder, or `hf:NAME[:CONFIG]`) and a slice such as `train[:90%]` as a
   stream of independently readable parts; `.documents()` reads them in order, and
   `load_documents` is that stream as a list.
2. `prepare_store(data, out, tokenizer, workers=N)` (`pldr data prepare`) has N processes
   read their own parts and tokenise them, each document with EOS appended (no BOS), into a
   token store (store.py): shards of uint16/uint32 ids with document offsets and a manifest.
   `load_tokens(data, tokenizer, split)` memory-maps a split of a store, and for a source
   prepares its store once in the cache folder: the one token format on disk.
3. `chunk_spans` / `chunk_tokens` group the documents (`group_size` of them at a time),
   concatenate each group and cut it into chunks in one of three modes: `pack`, `pad`,
   `nopad`. Chunks are `context_length + 1` tokens long: a model reads `chunk[:-1]` and
   predicts `chunk[1:]`.
4. `TokenBatches` yields LongTensor batches [B, context_length + 1] of chunks, shuffled per
   epoch from a seed, split over ranks without overlap, and resumable at any batch.

`build_loaders` does 2-4 for a training and a validation split, from a source or a store,
with the same batches from both. This package imports only the leaves of `pldr` (errors,
files), never the model, and no module here imports another's private names.
"""

from .chunks import MODES, PAD_ID, Chunks, chunk_spans, chunk_tokens
from .loader import TokenBatches, build_loaders
from .prepare import PrepareReport, prepare_store
from .sources import (
           BUILTIN,
           DEFAULT_HF_DATA,
           TEXT_COLUMNS,
           DataSource,
           SourcePart,
           SourceStream,
           load_documents,
           load_table,
           parse_source,
           stream_source,
)
from .splits import (
           DEFAULT_TRAIN_SPLIT,
           DEFAULT_VAL_SPLIT,
           Split,
           default_splits,
           parse_split,
)
from .store import ShardedTokens, TokenStore, is_store
from .tokenizer import Tokenizer
from .tokens import TokenizedDocs, load_tokens, token_cache_dir, tokenize_documents

__all__ = ["Tokenizer", "DataSource", "parse_source", "load_documents", "BUILTIN",
           "DEFAULT_HF_DATA", "TEXT_COLUMNS", "load_table", "Split", "parse_split", "default_splits",
           "DEFAULT_TRAIN_SPLIT", "DEFAULT_VAL_SPLIT", "TokenizedDocs", "tokenize_documents",
           "load_tokens", "token_cache_dir", "Chunks", "chunk_spans", "chunk_tokens", "MODES",
           "PAD_ID", "TokenBatches", "build_loaders", "stream_source", "SourceStream",
           "SourcePart", "prepare_store",
           "PrepareReport", "TokenStore", "ShardedTokens", "is_store"]
