"""Trace files: the routes of many sequences in one safetensors file.

Rollouts stream in one sequence at a time (`TraceWriter.append`); the trainer reads
one sequence at a time (`TraceFile.trace(i)`), or a range of its tokens
(`TraceFile.trace(i, start, stop)`, what `ThdPlan.rank_routes` reads for one rank),
touching only those bytes.

Format, version 3 (version 2 is the same without block checksums, each sequence's
checksum then over its bytes; version 1 is version 2 without prompt lengths and
sequence ids). A safetensors file (8-byte little-endian header length, JSON header,
tensor bytes) whose `__metadata__` carries everything needed to read it:

    format            "routereplay.trace"
    format_version    "3"
    num_layers        decoder layers of the model, e.g. "61"
    moe_layers        JSON list of the routed (global, 0-based) decoder layers: the
                      layer axis of every stored sequence, e.g. "[3, 4, ..., 60]"
    mtp_layers        JSON list of routed MTP layers of the model (not stored)
    num_experts       routed experts per layer
    top_k             experts per token and layer
    source            who recorded the routes ("vllm", "sglang", "recorded", ...)
    encoding          "compact" or "packed"
    bits_per_id       8, 16 or 32 for compact; ceil(log2(num_experts)) for packed
    num_sequences     S
    num_tokens        T, summed over all sequences
    offsets_crc32     zlib.crc32 of the `offsets` tensor's bytes
    checksums_crc32   zlib.crc32 of the `checksums` tensor's bytes
    block_tokens      tokens per checksummed block, a multiple of 8 ("32")
    block_checksums_crc32   zlib.crc32 of the `block_checksums` tensor's bytes
    prompt_lens_crc32    zlib.crc32 of `prompt_lens`, when the file holds it
    sequence_ids_crc32   zlib.crc32 of `sequence_id_offsets` then `sequence_ids`, when
                         the file holds them
    metadata_crc32    zlib.crc32 of the JSON list of every other [key, value] pair,
                      sorted by key, compact separators (version 2)

Tensors (L = len(moe_layers), k = top_k), each placed by the header: readers take
them in any order. This writer lays out `experts` first, streamed into place as
sequences arrive, then `routed`, `tokens` and the per-sequence index (earlier
writers put the index first):

    experts    compact: U8 / U16 / U32 [T, L, k] (up to 256 / 65536 / more experts)
               packed:  U8 [bytes], each sequence's T_i*L*k ids at bits_per_id bits,
                        most significant bit first, zero-padded to a whole byte
    routed     U8 [bytes]    each sequence's `[T_i, L]` routed mask, np.packbits,
                             zero-padded to a whole byte; 0 = no route (-1 row)
    tokens     I32 [T]       token ids, only when every appended sequence gave them
    offsets    I64 [S + 1]   token offsets: sequence i is tokens offsets[i]:offsets[i+1]
    sequence_id_offsets
               I64 [S + 1]   byte offsets of sequence i's id in `sequence_ids`
    checksums  U32 [S]       zlib.crc32 of sequence i's block checksums' bytes
    block_checksums
               U32 [blocks]  per sequence, per block of block_tokens tokens (the last
                             one partial): zlib.crc32 of the block's experts, routed and
                             tokens bytes; blocks start on byte boundaries
    prompt_lens
               I32 [S]       sequence i's prompt length: tokens before its completion
    sequence_ids
               U8 [bytes]    UTF-8 ids (request id and choice, or a user's uid), unique

The JSON header is padded with spaces to the room the writer kept for it before the
ids (the longest header its layout can have).

`prompt_lens`, `sequence_id_offsets` and `sequence_ids` are there only when every
appended sequence gave them, like `tokens`.

Ids of -1 rows are stored as 0: with 256 experts every 8-bit value is an expert, so
"no route" lives in the mask. The mask and the packed ids are padded per sequence so
that each sequence's bytes can be read alone; their byte offsets follow from
`offsets`. Reading is strict: a wrong length, a checksum or a key that does not
match is an error naming the file, never a guess.
"""

from routereplay.errors import TraceFileError
from routereplay.store.codec import ENCODINGS, Bytes, Encoding, compact_dtype, packed_bits
from routereplay.store.container import FORMAT, FORMAT_VERSION
from routereplay.store.reader import TraceFile
from routereplay.store.writer import TokenIds, TraceWriter

__all__ = [
    "ENCODINGS",
    "FORMAT",
    "FORMAT_VERSION",
    "Bytes",
    "Encoding",
    "TokenIds",
    "TraceFile",
    "TraceFileError",
    "TraceWriter",
    "compact_dtype",
    "packed_bits",
]
